//! A JPEG decoder whose pixels equal Pillow's: libjpeg-turbo 3's decoding with the defaults
//! Pillow runs it with (accurate integer IDCT, fancy upsampling), followed by Pillow's own
//! conversion to RGB. So a photo given to the program edits exactly as the same photo given to
//! diffusers (whose `load_image` is Pillow's `Image.open(...).convert("RGB")`).
//!
//! Reads baseline, extended-sequential and progressive Huffman-coded 8-bit JPEGs: grayscale, YCbCr
//! (any whole-ratio chroma subsampling: 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1, …), RGB (Adobe
//! transform 0 or components named R, G, B), CMYK and YCCK (Adobe), with restart markers, several
//! scans per component, tables defined between scans, and the standard Huffman tables where a
//! sequential file defines none (Motion-JPEG frames). Refused with a reason, as Pillow refuses
//! them or cannot read them the same way: 12- and 16-bit samples, lossless, arithmetic-coded and
//! hierarchical JPEGs, and component counts other than 1, 3 or 4.
//!
//! One difference from libjpeg-turbo is left: a progressive JPEG whose scans stop before every
//! coefficient is complete (one cut short and closed, or an encoder that never sends some bands)
//! is shown by libjpeg-turbo with "block smoothing" of the missing low frequencies; here those
//! coefficients stay zero. Encoders write complete files, where the two agree.
//!
//! The whole file is in memory; the sizes it declares are checked against [`MAX_PIXELS`] before
//! anything is allocated, and every large buffer is reserved fallibly.

mod entropy;
mod output;

use entropy::{Coefficients, Huffman, HuffmanSpec, ScanComponent, ScanKind, ScanLayout};
use output::{ColorSpace, Plane};

/// What can go wrong decoding a JPEG. The caller adds the file's name.
#[derive(Debug, thiserror::Error)]
pub enum JpegError {
    /// The data is not a JPEG or breaks its structure (the reason says how).
    #[error("{0}")]
    Invalid(String),
    /// A valid JPEG of a kind this decoder (and Pillow's view of it) does not handle.
    #[error("unsupported JPEG: {0}")]
    Unsupported(&'static str),
    /// The data ends before the end-of-image marker.
    #[error("the JPEG data is truncated: it ends before its end-of-image marker")]
    Truncated,
    /// The frame declares a zero width or height.
    #[error("the JPEG declares an empty image ({width}x{height})")]
    Empty { width: u32, height: u32 },
    /// The frame declares more pixels than the caller allows.
    #[error("the JPEG declares {width}x{height} pixels, more than the limit")]
    TooLarge { width: u32, height: u32 },
    /// Memory for the image could not be reserved.
    #[error("not enough memory to decode the JPEG")]
    OutOfMemory,
}

/// A decoded JPEG, as Pillow's `Image.open(...).convert("RGB")` gives it (no EXIF orientation
/// applied), with the EXIF block Pillow would read for `exif_transpose`.
pub struct Decoded<'a> {
    pub width: u32,
    pub height: u32,
    /// `width * height * 3` bytes, RGB.
    pub rgb: Vec<u8>,
    /// The TIFF data of the first APP1 "Exif" segment (after its `Exif\0\0` header).
    pub exif: Option<&'a [u8]>,
}

/// Largest image, in pixels, [`decode`] accepts unless told otherwise.
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// A component of the frame (SOF).
#[derive(Clone, Debug)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    quant_id: usize,
    /// The quantization table, latched at the component's first scan (as libjpeg does).
    quant: Option<[u16; 64]>,
    /// Downsampled size (`downsampled_width`/`height`).
    width: usize,
    height: usize,
}

struct Frame {
    progressive: bool,
    width: usize,
    height: usize,
    components: Vec<Component>,
    /// MCUs of an interleaved scan.
    mcus_x: usize,
    mcus_y: usize,
}

/// Decodes a whole JPEG file to RGB as Pillow does. `max_pixels` bounds the declared size.
pub fn decode(data: &[u8], max_pixels: u64) -> Result<Decoded<'_>, JpegError> {
    Decoder::new(data).run(max_pixels)
}

struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
    quant: [Option<[u16; 64]>; 4],
    dc_specs: [Option<HuffmanSpec>; 4],
    ac_specs: [Option<HuffmanSpec>; 4],
    restart_interval: usize,
    frame: Option<Frame>,
    coefs: Vec<Coefficients>,
    jfif: bool,
    adobe_transform: Option<u8>,
    exif: Option<&'a [u8]>,
    scans: usize,
}

impl<'a> Decoder<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            quant: [None; 4],
            dc_specs: Default::default(),
            ac_specs: Default::default(),
            restart_interval: 0,
            frame: None,
            coefs: Vec::new(),
            jfif: false,
            adobe_transform: None,
            exif: None,
            scans: 0,
        }
    }

    /// The code of the next marker, skipping bytes that are not one (libjpeg's `next_marker`
    /// warns about them and goes on). The first must be SOI.
    fn next_marker(&mut self) -> Result<u8, JpegError> {
        if self.pos == 0 {
            if !self.data.starts_with(&[0xFF, 0xD8]) {
                return Err(JpegError::Invalid("not a JPEG file".into()));
            }
            self.pos = 2;
            return Ok(0xD8);
        }
        loop {
            while self.pos < self.data.len() && self.data[self.pos] != 0xFF {
                self.pos += 1;
            }
            while self.pos < self.data.len() && self.data[self.pos] == 0xFF {
                self.pos += 1;
            }
            match self.data.get(self.pos) {
                None => return Err(JpegError::Truncated),
                Some(0) => self.pos += 1,
                Some(&code) => {
                    self.pos += 1;
                    return Ok(code);
                }
            }
        }
    }

    /// A marker segment's payload (after its length), advancing past it.
    fn segment(&mut self) -> Result<&'a [u8], JpegError> {
        let len = self
            .data
            .get(self.pos..self.pos + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or(JpegError::Truncated)?;
        if len < 2 {
            return Err(JpegError::Invalid(
                "a marker segment is shorter than its length field".into(),
            ));
        }
        let payload = self
            .data
            .get(self.pos + 2..self.pos + len)
            .ok_or(JpegError::Truncated)?;
        self.pos += len;
        Ok(payload)
    }

    fn run(mut self, max_pixels: u64) -> Result<Decoded<'a>, JpegError> {
        loop {
            let marker = self.next_marker()?;
            match marker {
                0xD8 => {
                    if self.pos != 2 {
                        return Err(JpegError::Invalid("a second start-of-image marker".into()));
                    }
                }
                0xC0..=0xC2 => {
                    let seg = self.segment()?;
                    self.read_frame(seg, marker == 0xC2, max_pixels)?;
                }
                0xC3 | 0xC7 | 0xCB | 0xCF => {
                    return Err(JpegError::Unsupported("lossless JPEG"));
                }
                0xC9..=0xCA => return Err(JpegError::Unsupported("arithmetic-coded JPEG")),
                0xC5 | 0xC6 | 0xCD | 0xCE => {
                    return Err(JpegError::Unsupported("hierarchical JPEG"));
                }
                0xC4 => {
                    let seg = self.segment()?;
                    self.read_huffman(seg)?;
                }
                0xDB => {
                    let seg = self.segment()?;
                    self.read_quant(seg)?;
                }
                0xDD => {
                    let seg = self.segment()?;
                    let b = seg
                        .get(..2)
                        .ok_or_else(|| JpegError::Invalid("a short DRI segment".into()))?;
                    self.restart_interval = usize::from(u16::from_be_bytes([b[0], b[1]]));
                }
                0xE0..=0xEF => {
                    let seg = self.segment()?;
                    self.read_app(marker, seg);
                }
                // COM, DNL, DAC, JPG: nothing to use.
                0xFE | 0xDC | 0xCC | 0xC8 => {
                    self.segment()?;
                }
                0xDA => {
                    let seg = self.segment()?;
                    self.read_scan(seg)?;
                }
                0xD9 => break,
                // RSTn outside scan data and TEM carry no segment.
                0xD0..=0xD7 | 0x01 => {}
                other => {
                    return Err(JpegError::Invalid(format!(
                        "unsupported marker type 0x{other:02x}"
                    )));
                }
            }
        }
        if self.frame.is_none() || self.scans == 0 {
            return Err(JpegError::Invalid("the JPEG holds no image data".into()));
        }
        self.finish()
    }

    fn read_app(&mut self, marker: u8, seg: &'a [u8]) {
        match marker {
            0xE0 if seg.len() >= 14 && seg.starts_with(b"JFIF\0") => self.jfif = true,
            0xE1 if seg.starts_with(b"Exif\0\0") && self.exif.is_none() => {
                self.exif = Some(&seg[6..]);
            }
            0xEE if seg.len() >= 12 && seg.starts_with(b"Adobe") => {
                self.adobe_transform = Some(seg[11]);
            }
            _ => {}
        }
    }

    fn read_quant(&mut self, mut seg: &[u8]) -> Result<(), JpegError> {
        while let Some((&pq_tq, rest)) = seg.split_first() {
            let precision16 = pq_tq >> 4 != 0;
            let id = usize::from(pq_tq & 15);
            if id >= 4 {
                return Err(JpegError::Invalid(format!(
                    "bogus quantization table id {id}"
                )));
            }
            let n = if precision16 { 128 } else { 64 };
            let values = rest
                .get(..n)
                .ok_or_else(|| JpegError::Invalid("a short DQT segment".into()))?;
            let mut table = [0u16; 64];
            for k in 0..64 {
                let v = if precision16 {
                    u16::from_be_bytes([values[2 * k], values[2 * k + 1]])
                } else {
                    u16::from(values[k])
                };
                table[entropy::NATURAL_ORDER[k]] = v;
            }
            self.quant[id] = Some(table);
            seg = &rest[n..];
        }
        Ok(())
    }

    fn read_huffman(&mut self, mut seg: &[u8]) -> Result<(), JpegError> {
        let bad = || JpegError::Invalid("bogus Huffman table definition".into());
        while let Some((&tc_th, rest)) = seg.split_first() {
            let counts: [u8; 16] = rest
                .get(..16)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?;
            let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
            if total > 256 {
                return Err(bad());
            }
            let symbols = rest.get(16..16 + total).ok_or_else(bad)?.to_vec();
            let id = usize::from(tc_th & 15);
            if id >= 4 || tc_th >> 4 > 1 {
                return Err(bad());
            }
            let spec = Some(HuffmanSpec { counts, symbols });
            if tc_th >> 4 == 0 {
                self.dc_specs[id] = spec;
            } else {
                self.ac_specs[id] = spec;
            }
            seg = &rest[16 + total..];
        }
        Ok(())
    }

    fn read_frame(
        &mut self,
        seg: &[u8],
        progressive: bool,
        max_pixels: u64,
    ) -> Result<(), JpegError> {
        if self.frame.is_some() {
            return Err(JpegError::Invalid("two frame (SOF) markers".into()));
        }
        let short = || JpegError::Invalid("a short frame (SOF) segment".into());
        let head = seg.get(..6).ok_or_else(short)?;
        let precision = head[0];
        let height = u32::from(u16::from_be_bytes([head[1], head[2]]));
        let width = u32::from(u16::from_be_bytes([head[3], head[4]]));
        let count = usize::from(head[5]);
        if precision != 8 {
            return Err(JpegError::Unsupported(
                "only 8-bit samples are read (Pillow refuses 12- and 16-bit JPEGs too)",
            ));
        }
        if width == 0 || height == 0 {
            return Err(JpegError::Empty { width, height });
        }
        if u64::from(width) * u64::from(height) > max_pixels {
            return Err(JpegError::TooLarge { width, height });
        }
        if !matches!(count, 1 | 3 | 4) {
            return Err(JpegError::Unsupported(
                "only 1, 3 or 4 components are read (Pillow cannot identify other counts)",
            ));
        }
        let specs = seg.get(6..6 + 3 * count).ok_or_else(short)?;
        let mut components = Vec::with_capacity(count);
        for c in specs.chunks_exact(3) {
            let (h, v) = (usize::from(c[1] >> 4), usize::from(c[1] & 15));
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                return Err(JpegError::Invalid("bogus sampling factors".into()));
            }
            let quant_id = usize::from(c[2]);
            if quant_id >= 4 {
                return Err(JpegError::Invalid(format!(
                    "bogus quantization table id {quant_id}"
                )));
            }
            components.push(Component {
                id: c[0],
                h,
                v,
                quant_id,
                quant: None,
                width: 0,
                height: 0,
            });
        }
        let max_h = components.iter().map(|c| c.h).max().unwrap_or(1);
        let max_v = components.iter().map(|c| c.v).max().unwrap_or(1);
        let factors: Vec<(usize, usize)> = components.iter().map(|c| (c.h, c.v)).collect();
        if !output::sampling_supported(&factors) {
            return Err(JpegError::Unsupported(
                "its sampling factors are not in whole ratios (libjpeg-turbo refuses them too)",
            ));
        }
        let (w, h) = (width as usize, height as usize);
        let mcus_x = w.div_ceil(8 * max_h);
        let mcus_y = h.div_ceil(8 * max_v);
        let mut coefs = Vec::with_capacity(count);
        for c in &mut components {
            c.width = (w * c.h).div_ceil(max_h);
            c.height = (h * c.v).div_ceil(max_v);
            let blocks_x = mcus_x * c.h;
            let blocks_y = mcus_y * c.v;
            coefs.push(Coefficients {
                blocks_x,
                blocks_y,
                data: output::zeroed(blocks_x * blocks_y * 64)?,
            });
        }
        self.coefs = coefs;
        self.frame = Some(Frame {
            progressive,
            width: w,
            height: h,
            components,
            mcus_x,
            mcus_y,
        });
        Ok(())
    }

    fn read_scan(&mut self, seg: &[u8]) -> Result<(), JpegError> {
        let frame = self
            .frame
            .as_mut()
            .ok_or_else(|| JpegError::Invalid("a scan (SOS) before the frame (SOF)".into()))?;
        let bad = || JpegError::Invalid("a bogus scan (SOS) header".into());
        let count = usize::from(*seg.first().ok_or_else(bad)?);
        if !(1..=4).contains(&count) || seg.len() < 1 + 2 * count + 3 {
            return Err(bad());
        }
        let mut members: Vec<(usize, usize, usize)> = Vec::with_capacity(count);
        for c in seg[1..1 + 2 * count].chunks_exact(2) {
            let index = frame
                .components
                .iter()
                .position(|comp| comp.id == c[0])
                .ok_or_else(|| {
                    JpegError::Invalid(format!(
                        "a scan names component {} that the frame lacks",
                        c[0]
                    ))
                })?;
            if members.iter().any(|m| m.0 == index) {
                return Err(JpegError::Invalid("a scan names a component twice".into()));
            }
            members.push((index, usize::from(c[1] >> 4), usize::from(c[1] & 15)));
        }
        let tail = &seg[1 + 2 * count..];
        let kind = ScanKind {
            progressive: frame.progressive,
            ss: tail[0],
            se: tail[1],
            ah: tail[2] >> 4,
            al: tail[2] & 15,
        };
        if kind.progressive {
            let dc = kind.ss == 0;
            let ok = if dc {
                kind.se == 0
            } else {
                kind.ss <= kind.se && kind.se < 64 && count == 1
            } && (kind.ah == 0 || kind.al + 1 == kind.ah)
                && kind.al <= 13;
            if !ok {
                return Err(JpegError::Invalid(format!(
                    "invalid progressive parameters Ss={} Se={} Ah={} Al={}",
                    kind.ss, kind.se, kind.ah, kind.al
                )));
            }
        }
        // Quantization tables are latched at a component's first scan.
        for &(index, _, _) in &members {
            let comp = &mut frame.components[index];
            if comp.quant.is_none() {
                comp.quant = Some(self.quant[comp.quant_id].ok_or_else(|| {
                    JpegError::Invalid(format!(
                        "quantization table {} was not defined",
                        comp.quant_id
                    ))
                })?);
            }
        }
        // Huffman tables this scan uses.
        let needs_dc = !kind.progressive || (kind.ss == 0 && kind.ah == 0);
        let needs_ac = !kind.progressive || kind.ss > 0;
        let mut dc_tables: Vec<Option<Huffman>> = Vec::with_capacity(count);
        let mut ac_tables: Vec<Option<Huffman>> = Vec::with_capacity(count);
        for &(_, td, ta) in &members {
            let table = |specs: &[Option<HuffmanSpec>; 4], id: usize, is_dc: bool| {
                let spec = specs.get(id).cloned().flatten().or_else(|| {
                    (!kind.progressive)
                        .then(|| entropy::standard_table(is_dc, id))
                        .flatten()
                });
                let spec = spec.ok_or_else(|| {
                    JpegError::Invalid(format!(
                        "Huffman table 0x{:02x} was not defined",
                        if is_dc { id } else { 0x10 + id }
                    ))
                })?;
                Huffman::new(&spec, is_dc).map(Some)
            };
            dc_tables.push(if needs_dc {
                table(&self.dc_specs, td, true)?
            } else {
                None
            });
            ac_tables.push(if needs_ac {
                table(&self.ac_specs, ta, false)?
            } else {
                None
            });
        }
        let scan_comps: Vec<ScanComponent<'_>> = members
            .iter()
            .enumerate()
            .map(|(i, &(index, _, _))| {
                let comp = &frame.components[index];
                let (h, v) = if count == 1 { (1, 1) } else { (comp.h, comp.v) };
                ScanComponent {
                    index,
                    h,
                    v,
                    dc: dc_tables[i].as_ref(),
                    ac: ac_tables[i].as_ref(),
                }
            })
            .collect();
        let layout = if count == 1 {
            let comp = &frame.components[members[0].0];
            ScanLayout {
                mcus_x: comp.width.div_ceil(8),
                mcus_y: comp.height.div_ceil(8),
                restart_interval: self.restart_interval,
            }
        } else {
            let blocks: usize = scan_comps.iter().map(|c| c.h * c.v).sum();
            if blocks > 10 {
                return Err(JpegError::Invalid(
                    "sampling factors too large for an interleaved scan".into(),
                ));
            }
            ScanLayout {
                mcus_x: frame.mcus_x,
                mcus_y: frame.mcus_y,
                restart_interval: self.restart_interval,
            }
        };
        self.pos = entropy::decode_scan(
            self.data,
            self.pos,
            kind,
            &scan_comps,
            &layout,
            &mut self.coefs,
        );
        self.scans += 1;
        Ok(())
    }

    /// IDCT, upsampling and colour conversion, then Pillow's conversion to RGB.
    fn finish(self) -> Result<Decoded<'a>, JpegError> {
        let Some(frame) = self.frame else {
            return Err(JpegError::Invalid("the JPEG holds no image data".into()));
        };
        let space = match frame.components.len() {
            1 => ColorSpace::Gray,
            3 => {
                if self.jfif {
                    ColorSpace::YCbCr
                } else if let Some(transform) = self.adobe_transform {
                    if transform == 0 {
                        ColorSpace::Rgb
                    } else {
                        ColorSpace::YCbCr
                    }
                } else {
                    let ids: Vec<u8> = frame.components.iter().map(|c| c.id).collect();
                    if ids == [b'R', b'G', b'B'] {
                        ColorSpace::Rgb
                    } else {
                        ColorSpace::YCbCr
                    }
                }
            }
            _ => match self.adobe_transform {
                Some(0) | None => ColorSpace::Cmyk,
                Some(_) => ColorSpace::Ycck,
            },
        };
        let mut planes: Vec<(Plane, (usize, usize))> = Vec::with_capacity(frame.components.len());
        for (comp, coefs) in frame.components.iter().zip(&self.coefs) {
            // A component no scan named has no table: libjpeg leaves its IDCT multipliers zero.
            let quant = comp.quant.unwrap_or([0; 64]);
            let plane = output::inverse_dct(coefs, &quant, comp.width, comp.height)?;
            planes.push((plane, (comp.h, comp.v)));
        }
        drop(self.coefs);
        let samples = output::to_pixels(&planes, space, frame.width, frame.height)?;
        drop(planes);
        let rgb = match space {
            ColorSpace::Gray => {
                let mut rgb = output::zeroed::<u8>(samples.len() * 3)?;
                for (px, &g) in rgb.chunks_exact_mut(3).zip(&samples) {
                    px.fill(g);
                }
                rgb
            }
            ColorSpace::YCbCr | ColorSpace::Rgb => samples,
            ColorSpace::Cmyk | ColorSpace::Ycck => {
                let mut rgb = output::zeroed::<u8>(samples.len() / 4 * 3)?;
                for (px, cmyk) in rgb.chunks_exact_mut(3).zip(samples.chunks_exact(4)) {
                    px.copy_from_slice(&pillow_cmyk_to_rgb(cmyk));
                }
                rgb
            }
        };
        Ok(Decoded {
            width: frame.width as u32,
            height: frame.height as u32,
            rgb,
            exif: self.exif,
        })
    }
}

/// Pillow reads every CMYK JPEG as Adobe-inverted ("CMYK;I": each sample is 255 − value), then
/// `convert("RGB")` (Convert.c `cmyk2rgb`): channel = 255 − K − C·(255 − K)/255, rounded as
/// Pillow's `MULDIV255`.
fn pillow_cmyk_to_rgb(stored: &[u8]) -> [u8; 3] {
    let [c, m, y, k] = [0, 1, 2, 3].map(|i| 255 - i32::from(stored[i]));
    let nk = 255 - k;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v, nk)).clamp(0, 255) as u8)
}
