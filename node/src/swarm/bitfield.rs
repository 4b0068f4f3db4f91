//! [`Bitfield`]: a fixed-length set of chunk indices, one bit per chunk.

use std::fmt;

use smallvec::{SmallVec, smallvec};

use super::ChunkIndex;

/// Errors building a [`Bitfield`] from untrusted input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BitfieldError {
    /// The encoded bitfield does not have `ceil(len / 8)` bytes.
    #[error("bitfield of {got} bytes, expected {expected}")]
    Length {
        /// Bytes a bitfield of this length takes.
        expected: usize,
        /// Bytes that were given.
        got: usize,
    },
    /// A bit past the last chunk is set in the final byte.
    #[error("bitfield has bits set past the last chunk")]
    SpareBits,
    /// A chunk index is not below the bitfield's length.
    #[error("chunk index {index} out of range for {len} chunks")]
    IndexOutOfRange {
        /// The offending index.
        index: ChunkIndex,
        /// The bitfield's length.
        len: u32,
    },
}

/// Words kept inline, without a heap allocation: manifests of up to 256 chunks (1 MiB chunks of
/// artifacts up to about 256 MiB). A scheduler holds one bitfield per connected peer and reads
/// one on every `Have`; inline, the words share the cache lines of the peer's other state
/// instead of costing a miss of their own.
const INLINE_WORDS: usize = 4;

/// The set of chunks a host holds, for a manifest of [`bit_len`](Self::bit_len) chunks.
///
/// Stored as `u64` words (so a 3,200-chunk manifest takes 400 bytes; up to 256 chunks, inline)
/// with a cached count of set bits, which makes [`is_full`](Self::is_full) and
/// [`count_ones`](Self::count_ones) O(1). Bits past the length are always zero.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Bitfield {
    words: SmallVec<[u64; INLINE_WORDS]>,
    len: u32,
    ones: u32,
}

impl Bitfield {
    /// An empty set over `len` chunks.
    pub fn new(len: u32) -> Self {
        Self { words: smallvec![0; words_for(len)], len, ones: 0 }
    }

    /// The set of all `len` chunks.
    pub fn full(len: u32) -> Self {
        let mut words = smallvec![u64::MAX; words_for(len)];
        if let Some(last) = words.last_mut() {
            *last = tail_mask(len);
        }
        Self { words, len, ones: len }
    }

    /// The set of the given chunk indices over `len` chunks (duplicates are fine).
    pub fn from_indices(
        len: u32,
        indices: impl IntoIterator<Item = ChunkIndex>,
    ) -> Result<Self, BitfieldError> {
        let mut bits = Self::new(len);
        for index in indices {
            if index >= len {
                return Err(BitfieldError::IndexOutOfRange { index, len });
            }
            bits.insert(index);
        }
        Ok(bits)
    }

    /// Decodes the wire form (see [`to_bytes`](Self::to_bytes)), checking its length and that no
    /// bit past the last chunk is set.
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Result<Self, BitfieldError> {
        let expected = len.div_ceil(8) as usize;
        if bytes.len() != expected {
            return Err(BitfieldError::Length { expected, got: bytes.len() });
        }
        let mut words = smallvec![0u64; words_for(len)];
        for (i, &byte) in bytes.iter().enumerate() {
            // Wire order is most significant bit first: chunk 8*i is the top bit of byte i.
            let byte = u64::from(byte.reverse_bits());
            words[i / 8] |= byte << ((i % 8) * 8);
        }
        if words.last().is_some_and(|last| last & !tail_mask(len) != 0) {
            return Err(BitfieldError::SpareBits);
        }
        let ones = words.iter().map(|w| w.count_ones()).sum();
        Ok(Self { words, len, ones })
    }

    /// The wire form: `ceil(len / 8)` bytes, chunk `i` in bit `7 - i % 8` of byte `i / 8` (the
    /// BitTorrent order), spare bits zero.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len.div_ceil(8) as usize);
        for i in 0..self.len.div_ceil(8) as usize {
            let byte = (self.words[i / 8] >> ((i % 8) * 8)) as u8;
            out.push(byte.reverse_bits());
        }
        out
    }

    /// Number of chunks the set ranges over (the manifest's chunk count).
    pub fn bit_len(&self) -> u32 {
        self.len
    }

    /// Number of chunks in the set.
    pub fn count_ones(&self) -> u32 {
        self.ones
    }

    /// Whether every chunk is in the set (true for a zero-length set).
    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// Whether `index` is in the set (false when out of range).
    pub fn contains(&self, index: ChunkIndex) -> bool {
        index < self.len && self.words[index as usize / 64] & (1 << (index % 64)) != 0
    }

    /// Adds `index`; returns whether it was newly added.
    ///
    /// # Panics
    ///
    /// If `index >= bit_len()`, like slice indexing: callers validate untrusted indices first.
    pub fn insert(&mut self, index: ChunkIndex) -> bool {
        assert!(index < self.len, "chunk index {index} out of range for {} chunks", self.len);
        let word = &mut self.words[index as usize / 64];
        let mask = 1 << (index % 64);
        let added = *word & mask == 0;
        *word |= mask;
        self.ones += u32::from(added);
        added
    }

    /// Removes `index`; returns whether it was present (false when out of range).
    pub fn remove(&mut self, index: ChunkIndex) -> bool {
        if !self.contains(index) {
            return false;
        }
        self.words[index as usize / 64] &= !(1 << (index % 64));
        self.ones -= 1;
        true
    }

    /// The chunks in the set, in increasing order.
    pub fn iter(&self) -> Ones<'_> {
        Ones { words: &self.words, next_word: 0, current: 0, base: 0 }
    }
}

impl fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitfield({}/{})", self.ones, self.len)
    }
}

impl<'a> IntoIterator for &'a Bitfield {
    type Item = ChunkIndex;
    type IntoIter = Ones<'a>;

    fn into_iter(self) -> Ones<'a> {
        self.iter()
    }
}

/// Iterator over the chunks in a [`Bitfield`], from [`Bitfield::iter`].
#[derive(Clone, Debug)]
pub struct Ones<'a> {
    words: &'a [u64],
    next_word: usize,
    current: u64,
    base: u32,
}

impl Iterator for Ones<'_> {
    type Item = ChunkIndex;

    fn next(&mut self) -> Option<ChunkIndex> {
        while self.current == 0 {
            let word = *self.words.get(self.next_word)?;
            self.base = self.next_word as u32 * 64;
            self.current = word;
            self.next_word += 1;
        }
        let bit = self.current.trailing_zeros();
        self.current &= self.current - 1;
        Some(self.base + bit)
    }
}

fn words_for(len: u32) -> usize {
    len.div_ceil(64) as usize
}

/// Mask of the valid bits in the last word of a `len`-bit set.
fn tail_mask(len: u32) -> u64 {
    match len % 64 {
        0 => u64::MAX,
        r => (1 << r) - 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_and_bit_order() {
        let bits = Bitfield::from_indices(10, [0, 7, 9]).expect("in range");
        assert_eq!(bits.to_bytes(), vec![0b1000_0001, 0b0100_0000]);
        assert_eq!(Bitfield::from_bytes(10, &bits.to_bytes()), Ok(bits.clone()));
        assert_eq!(bits.iter().collect::<Vec<_>>(), vec![0, 7, 9]);
        assert_eq!(bits.count_ones(), 3);
    }

    #[test]
    fn rejects_bad_wire_forms() {
        assert_eq!(
            Bitfield::from_bytes(10, &[0]),
            Err(BitfieldError::Length { expected: 2, got: 1 })
        );
        assert_eq!(Bitfield::from_bytes(10, &[0, 0b0010_0000]), Err(BitfieldError::SpareBits));
        assert_eq!(
            Bitfield::from_indices(3, [3]),
            Err(BitfieldError::IndexOutOfRange { index: 3, len: 3 })
        );
    }

    #[test]
    fn full_and_edges() {
        for len in [0, 1, 63, 64, 65, 200] {
            let full = Bitfield::full(len);
            assert!(full.is_full());
            assert_eq!(full.iter().count(), len as usize);
            assert_eq!(Bitfield::from_bytes(len, &full.to_bytes()), Ok(full.clone()));
            let mut bits = Bitfield::new(len);
            assert!(!bits.contains(len));
            for i in 0..len {
                assert!(bits.insert(i));
            }
            assert_eq!(bits, full);
            assert!(!bits.remove(len));
        }
    }
}
