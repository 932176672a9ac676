//! Helpers shared by the library's unit tests (compiled only for them).

use std::ops::Range;

/// A xorshift64 generator: deterministic draws for the seeded fuzz tests.
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A draw in `0..below`.
    pub(crate) fn below(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }

    /// `valid` damaged one way, drawn at random: one to four bytes changed, the file cut short,
    /// or a digit inside `digits` (a header's numbers) changed to another digit.
    pub(crate) fn damage(&mut self, valid: &[u8], digits: Range<usize>) -> Vec<u8> {
        let mut bytes = valid.to_vec();
        match self.below(3) {
            0 => {
                for _ in 0..1 + self.below(4) {
                    let at = self.below(bytes.len());
                    bytes[at] = self.below(256) as u8;
                }
            }
            1 => bytes.truncate(self.below(bytes.len())),
            _ => {
                let at = digits.start + self.below(digits.len());
                if bytes[at].is_ascii_digit() {
                    bytes[at] = b'0' + self.below(10) as u8;
                }
            }
        }
        bytes
    }
}
