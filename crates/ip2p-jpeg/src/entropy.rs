//! Huffman-coded scan data: the bit reader (byte stuffing, markers inside the data, restart
//! markers) and the four progressive procedures and the sequential one, as libjpeg-turbo's
//! `jdhuff.c` / `jdphuff.c` decode them, into each component's coefficient blocks.
//!
//! Damaged data behaves as in libjpeg-turbo where that is cheap to copy: a marker met inside the
//! data ends it, the rest of the MCU reads zero bits and the scan's later MCUs (up to the next
//! restart marker) are left as they are; an invalid Huffman code decodes as symbol 0. Nothing
//! here can panic or loop without consuming input.

use super::JpegError;

/// `jpeg_natural_order` with libjpeg's 16 extra entries: a run that overshoots coefficient 63
/// (damaged data) lands on 63 instead of outside the block.
pub(super) const NATURAL_ORDER: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    63, 63, 63, 63, 63, 63,
];

/// Bits looked up at once (libjpeg's `HUFF_LOOKAHEAD`).
const LOOKAHEAD: u32 = 9;

/// A Huffman table as decoded from DHT: counts of codes of each length 1..=16 and the symbols.
#[derive(Clone, Debug)]
pub(super) struct HuffmanSpec {
    pub counts: [u8; 16],
    pub symbols: Vec<u8>,
}

/// The decoding form of a table (`d_derived_tbl`).
pub(super) struct Huffman {
    /// Largest code of each length (index = length), -1 where there is none; `maxcode[17]` is a
    /// sentinel that ends the search.
    maxcode: [i64; 18],
    /// Symbol index of the first code of each length minus that code.
    valoffset: [i64; 18],
    symbols: Vec<u8>,
    /// For each `LOOKAHEAD`-bit prefix: code length (0 if longer) and symbol.
    lookup: Vec<(u8, u8)>,
}

impl Huffman {
    /// `jpeg_make_d_derived_tbl`: refuses tables that overrun 256 symbols, are not a valid
    /// prefix code, or (for DC) hold symbols above 15.
    pub fn new(spec: &HuffmanSpec, is_dc: bool) -> Result<Self, JpegError> {
        let bad = || JpegError::Invalid("bogus Huffman table definition".into());
        let total: usize = spec.counts.iter().map(|&c| usize::from(c)).sum();
        if total > 256 || total > spec.symbols.len() {
            return Err(bad());
        }
        let mut sizes = Vec::with_capacity(total);
        for (len, &count) in spec.counts.iter().enumerate() {
            sizes.extend(std::iter::repeat_n(len as u32 + 1, usize::from(count)));
        }
        let mut codes = Vec::with_capacity(total);
        let mut code: u64 = 0;
        let mut p = 0;
        if let Some(&first) = sizes.first() {
            let mut si = first;
            while p < sizes.len() {
                while p < sizes.len() && sizes[p] == si {
                    codes.push(code);
                    code += 1;
                    p += 1;
                }
                if code >= 1u64 << si {
                    return Err(bad());
                }
                code <<= 1;
                si += 1;
            }
        }
        let mut maxcode = [-1i64; 18];
        let mut valoffset = [0i64; 18];
        let mut p = 0usize;
        for len in 1..=16usize {
            let count = usize::from(spec.counts[len - 1]);
            if count > 0 {
                valoffset[len] = p as i64 - codes[p] as i64;
                p += count;
                maxcode[len] = codes[p - 1] as i64;
            }
        }
        maxcode[17] = i64::MAX;
        let symbols = spec.symbols[..total].to_vec();
        if is_dc && symbols.iter().any(|&s| s > 15) {
            return Err(bad());
        }
        let mut lookup = vec![(0u8, 0u8); 1 << LOOKAHEAD];
        for (i, (&size, &code)) in sizes.iter().zip(&codes).enumerate() {
            if size <= LOOKAHEAD {
                let shift = LOOKAHEAD - size;
                let start = (code as usize) << shift;
                for entry in &mut lookup[start..start + (1 << shift)] {
                    *entry = (size as u8, symbols[i]);
                }
            }
        }
        Ok(Self {
            maxcode,
            valoffset,
            symbols,
            lookup,
        })
    }
}

/// The standard tables of ITU T.81 Annex K.3, which libjpeg-turbo uses for a sequential JPEG
/// that defines none (Motion-JPEG frames): table 0 luminance, table 1 chrominance.
pub(super) fn standard_table(is_dc: bool, id: usize) -> Option<HuffmanSpec> {
    const DC_LUMA_COUNTS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    const DC_CHROMA_COUNTS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    const AC_LUMA_COUNTS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];
    const AC_CHROMA_COUNTS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
    const AC_LUMA_SYMBOLS: [u8; 162] = [
        0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61,
        0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52,
        0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25,
        0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45,
        0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64,
        0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83,
        0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
        0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6,
        0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3,
        0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8,
        0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    const AC_CHROMA_SYMBOLS: [u8; 162] = [
        0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61,
        0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33,
        0x52, 0xf0, 0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18,
        0x19, 0x1a, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44,
        0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63,
        0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a,
        0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97,
        0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4,
        0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca,
        0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7,
        0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    let dc_symbols: Vec<u8> = (0..12).collect();
    match (is_dc, id) {
        (true, 0) => Some(HuffmanSpec {
            counts: DC_LUMA_COUNTS,
            symbols: dc_symbols,
        }),
        (true, 1) => Some(HuffmanSpec {
            counts: DC_CHROMA_COUNTS,
            symbols: dc_symbols,
        }),
        (false, 0) => Some(HuffmanSpec {
            counts: AC_LUMA_COUNTS,
            symbols: AC_LUMA_SYMBOLS.to_vec(),
        }),
        (false, 1) => Some(HuffmanSpec {
            counts: AC_CHROMA_COUNTS,
            symbols: AC_CHROMA_SYMBOLS.to_vec(),
        }),
        _ => None,
    }
}

/// Reads entropy-coded bits from `data[pos..]`: FF 00 is a data FF, FF FF… are fill bytes, any
/// other FF xx is a marker, after which only zero bits come (and `insufficient` is set once one
/// of them is used), as libjpeg-turbo's `jpeg_fill_bit_buffer` does.
pub(super) struct BitReader<'a> {
    data: &'a [u8],
    pub pos: usize,
    buffer: u64,
    /// Valid bits in `buffer` (the top `bits` bits).
    bits: u32,
    /// Of those, how many at the low end are zeros supplied after a marker.
    padding: u32,
    /// A marker was met: `pos` is at its FF.
    pub marker_hit: bool,
    /// Zero bits supplied after a marker were used (libjpeg's `insufficient_data`).
    pub insufficient: bool,
}

impl<'a> BitReader<'a> {
    pub fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            buffer: 0,
            bits: 0,
            padding: 0,
            marker_hit: false,
            insufficient: false,
        }
    }

    fn fill(&mut self) {
        while self.bits <= 56 {
            let byte = if self.marker_hit {
                self.padding += 8;
                0
            } else {
                match self.data.get(self.pos) {
                    None => {
                        // The end of the input: as a marker (the caller reports truncation).
                        self.marker_hit = true;
                        continue;
                    }
                    Some(&0xFF) => {
                        let mut next = self.pos + 1;
                        while self.data.get(next) == Some(&0xFF) {
                            next += 1;
                        }
                        if self.data.get(next) == Some(&0) {
                            self.pos = next + 1;
                            0xFF
                        } else {
                            // A marker (or the end): leave `pos` on its last FF.
                            self.pos = next - 1;
                            self.marker_hit = true;
                            continue;
                        }
                    }
                    Some(&b) => {
                        self.pos += 1;
                        b
                    }
                }
            };
            self.buffer |= u64::from(byte) << (56 - self.bits);
            self.bits += 8;
        }
    }

    fn consume(&mut self, n: u32) {
        self.buffer <<= n;
        self.bits -= n;
        if self.padding > self.bits {
            self.insufficient = true;
            self.padding = self.bits;
        }
    }

    /// `n` bits (at most 16) as an unsigned number.
    pub fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.bits < n {
            self.fill();
        }
        let value = (self.buffer >> (64 - n)) as u32;
        self.consume(n);
        value
    }

    pub fn bit(&mut self) -> bool {
        self.bits(1) != 0
    }

    /// One Huffman symbol; a code matching no symbol decodes as 0 (libjpeg warns "bad Huffman
    /// code" and goes on).
    pub fn decode(&mut self, table: &Huffman) -> u8 {
        if self.bits < 16 {
            self.fill();
        }
        let peek = (self.buffer >> (64 - LOOKAHEAD)) as usize;
        let (len, symbol) = table.lookup[peek];
        if len > 0 {
            self.consume(u32::from(len));
            return symbol;
        }
        let top = self.buffer >> 48;
        let mut len = LOOKAHEAD as usize + 1;
        while len <= 16 {
            let code = (top >> (16 - len)) as i64;
            if code <= table.maxcode[len] {
                self.consume(len as u32);
                let index = code + table.valoffset[len];
                return usize::try_from(index)
                    .ok()
                    .and_then(|i| table.symbols.get(i))
                    .copied()
                    .unwrap_or(0);
            }
            len += 1;
        }
        self.consume(16);
        0
    }

    /// A magnitude category `s` followed by its `s` bits, as a signed value (`HUFF_EXTEND`).
    pub fn receive_extend(&mut self, s: u8) -> i32 {
        if s == 0 {
            return 0;
        }
        if s > 16 {
            // Only damaged tables give this (AC symbols have 4-bit sizes); libjpeg reads the
            // bits in two steps; the value matters to no valid file.
            let high = self.bits(u32::from(s) - 16) as i32;
            let low = self.bits(16) as i32;
            return high.wrapping_shl(16) | low;
        }
        let v = self.bits(u32::from(s)) as i32;
        if v < (1 << (s - 1)) {
            v + ((-1) << s) + 1
        } else {
            v
        }
    }

    /// At a restart point: drop the remaining bits of the byte and read the RSTn marker if it is
    /// next (skipping garbage before a marker, as libjpeg's `next_marker`). Returns whether the
    /// reader may go on with real data.
    pub fn restart(&mut self) {
        self.buffer = 0;
        self.bits = 0;
        self.padding = 0;
        if !self.marker_hit {
            // Find the next marker.
            while self.pos < self.data.len() {
                if self.data[self.pos] == 0xFF {
                    let mut next = self.pos + 1;
                    while self.data.get(next) == Some(&0xFF) {
                        next += 1;
                    }
                    if next < self.data.len() && self.data[next] != 0 {
                        self.pos = next - 1;
                        break;
                    }
                    self.pos = next + 1;
                } else {
                    self.pos += 1;
                }
            }
        }
        // pos is on the FF of a marker, or at the end.
        if let Some(&code) = self.data.get(self.pos + 1)
            && (0xD0..=0xD7).contains(&code)
        {
            self.pos += 2;
            self.marker_hit = false;
            self.insufficient = false;
        } else {
            self.marker_hit = true;
        }
    }

    /// After the scan: where the next marker is (skipping what is left of the data).
    pub fn end(mut self) -> usize {
        if !self.marker_hit {
            while self.pos < self.data.len() {
                if self.data[self.pos] == 0xFF {
                    let mut next = self.pos + 1;
                    while self.data.get(next) == Some(&0xFF) {
                        next += 1;
                    }
                    if next < self.data.len() && self.data[next] != 0 {
                        return next - 1;
                    }
                    self.pos = next + 1;
                } else {
                    self.pos += 1;
                }
            }
        }
        self.pos.min(self.data.len())
    }
}

/// What one scan decodes (`Ss`, `Se`, `Ah`, `Al` as in its SOS; all zero in sequential mode).
#[derive(Clone, Copy, Debug)]
pub(super) struct ScanKind {
    pub progressive: bool,
    pub ss: u8,
    pub se: u8,
    pub ah: u8,
    pub al: u8,
}

/// One component's part in a scan: where its blocks are and which tables decode them.
pub(super) struct ScanComponent<'t> {
    /// Index into the component array.
    pub index: usize,
    /// Blocks of this component in one MCU: horizontally and vertically (1×1 for a scan of one
    /// component).
    pub h: usize,
    pub v: usize,
    pub dc: Option<&'t Huffman>,
    pub ac: Option<&'t Huffman>,
}

/// The geometry of a scan's MCUs.
pub(super) struct ScanLayout {
    pub mcus_x: usize,
    pub mcus_y: usize,
    pub restart_interval: usize,
}

/// Coefficient blocks of one component: `blocks_x × blocks_y` blocks of 64 coefficients in
/// natural (row-major) order.
pub(super) struct Coefficients {
    pub blocks_x: usize,
    pub blocks_y: usize,
    pub data: Vec<i16>,
}

/// Decodes one scan's entropy-coded data starting at `pos`; returns where its data ends (the next
/// marker).
pub(super) fn decode_scan(
    data: &[u8],
    pos: usize,
    kind: ScanKind,
    comps: &[ScanComponent<'_>],
    layout: &ScanLayout,
    coefs: &mut [Coefficients],
) -> usize {
    let mut reader = BitReader::new(data, pos);
    let mut dc_pred = [0i32; 4];
    let mut eobrun: u32 = 0;
    let mut restarts_to_go = layout.restart_interval;
    let mut scratch: [i16; 64];
    for mcu_y in 0..layout.mcus_y {
        for mcu_x in 0..layout.mcus_x {
            if layout.restart_interval > 0 {
                if restarts_to_go == 0 {
                    reader.restart();
                    dc_pred = [0; 4];
                    eobrun = 0;
                    restarts_to_go = layout.restart_interval;
                }
                restarts_to_go -= 1;
            }
            if reader.insufficient {
                continue;
            }
            for (slot, comp) in comps.iter().enumerate() {
                let target = &mut coefs[comp.index];
                for by in 0..comp.v {
                    for bx in 0..comp.h {
                        let x = mcu_x * comp.h + bx;
                        let y = mcu_y * comp.v + by;
                        // Every block of the MCU is decoded, to stay in step with the data; one
                        // outside the stored grid (never, for the grids `super` makes) is
                        // decoded into scratch.
                        let stored = (x < target.blocks_x && y < target.blocks_y)
                            .then(|| (y * target.blocks_x + x) * 64)
                            .and_then(|at| target.data.get_mut(at..at + 64))
                            .and_then(|b| <&mut [i16; 64]>::try_from(b).ok());
                        let block = match stored {
                            Some(block) => block,
                            None => {
                                scratch = [0; 64];
                                &mut scratch
                            }
                        };
                        decode_block(
                            &mut reader,
                            kind,
                            comp,
                            &mut dc_pred[slot],
                            &mut eobrun,
                            block,
                        );
                    }
                }
            }
        }
    }
    reader.end()
}

fn decode_block(
    reader: &mut BitReader<'_>,
    kind: ScanKind,
    comp: &ScanComponent<'_>,
    dc_pred: &mut i32,
    eobrun: &mut u32,
    block: &mut [i16; 64],
) {
    if !kind.progressive {
        decode_sequential(reader, comp, dc_pred, block);
    } else if kind.ss == 0 {
        if kind.ah == 0 {
            if let Some(dc) = comp.dc {
                let s = reader.decode(dc);
                let diff = reader.receive_extend(s);
                *dc_pred = dc_pred.wrapping_add(diff);
                block[0] = dc_pred.wrapping_shl(u32::from(kind.al)) as i16;
            }
        } else if reader.bit() {
            block[0] |= (1i32 << kind.al) as i16;
        }
    } else if let Some(ac) = comp.ac {
        if kind.ah == 0 {
            decode_ac_first(reader, ac, kind, eobrun, block);
        } else {
            decode_ac_refine(reader, ac, kind, eobrun, block);
        }
    }
}

fn decode_sequential(
    reader: &mut BitReader<'_>,
    comp: &ScanComponent<'_>,
    dc_pred: &mut i32,
    block: &mut [i16; 64],
) {
    let (Some(dc), Some(ac)) = (comp.dc, comp.ac) else {
        return;
    };
    let s = reader.decode(dc);
    let diff = reader.receive_extend(s);
    *dc_pred = dc_pred.wrapping_add(diff);
    block[0] = *dc_pred as i16;
    let mut k = 1usize;
    while k < 64 {
        let rs = reader.decode(ac);
        let r = usize::from(rs >> 4);
        let s = rs & 15;
        if s != 0 {
            k += r;
            let value = reader.receive_extend(s);
            block[NATURAL_ORDER[k.min(79)]] = value as i16;
        } else if r != 15 {
            break;
        } else {
            k += 15;
        }
        k += 1;
    }
}

fn decode_ac_first(
    reader: &mut BitReader<'_>,
    ac: &Huffman,
    kind: ScanKind,
    eobrun: &mut u32,
    block: &mut [i16; 64],
) {
    if *eobrun > 0 {
        *eobrun -= 1;
        return;
    }
    let mut k = usize::from(kind.ss);
    let se = usize::from(kind.se);
    while k <= se {
        let rs = reader.decode(ac);
        let r = u32::from(rs >> 4);
        let s = rs & 15;
        if s != 0 {
            k += r as usize;
            let value = reader.receive_extend(s);
            block[NATURAL_ORDER[k.min(79)]] = value.wrapping_shl(u32::from(kind.al)) as i16;
        } else if r == 15 {
            k += 15;
        } else {
            *eobrun = 1 << r;
            if r > 0 {
                *eobrun += reader.bits(r);
            }
            *eobrun -= 1;
            break;
        }
        k += 1;
    }
}

fn decode_ac_refine(
    reader: &mut BitReader<'_>,
    ac: &Huffman,
    kind: ScanKind,
    eobrun: &mut u32,
    block: &mut [i16; 64],
) {
    let p1 = (1i32 << kind.al) as i16;
    let m1 = ((-1i32) << kind.al) as i16;
    let se = usize::from(kind.se);
    let mut k = usize::from(kind.ss);
    let refine = |reader: &mut BitReader<'_>, coef: &mut i16| {
        if reader.bit() && (*coef & p1) == 0 {
            *coef = if *coef >= 0 {
                coef.wrapping_add(p1)
            } else {
                coef.wrapping_add(m1)
            };
        }
    };
    if *eobrun == 0 {
        while k <= se {
            let rs = reader.decode(ac);
            let mut r = i32::from(rs >> 4);
            let mut s = i16::from(rs & 15);
            if s != 0 {
                s = if reader.bit() { p1 } else { m1 };
            } else if r != 15 {
                *eobrun = 1 << r;
                if r > 0 {
                    *eobrun += reader.bits(r as u32);
                }
                break;
            }
            loop {
                let coef = &mut block[NATURAL_ORDER[k.min(79)]];
                if *coef != 0 {
                    refine(reader, coef);
                } else {
                    r -= 1;
                    if r < 0 {
                        break;
                    }
                }
                k += 1;
                if k > se {
                    break;
                }
            }
            if s != 0 {
                block[NATURAL_ORDER[k.min(79)]] = s;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= se {
            let coef = &mut block[NATURAL_ORDER[k]];
            if *coef != 0 {
                refine(reader, coef);
            }
            k += 1;
        }
        *eobrun -= 1;
    }
}
