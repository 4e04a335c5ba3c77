//! The few things automerge-repo frames need on top of `minicbor`'s pull decoder.
//!
//! Why a pull decoder and not a value tree (`ciborium::Value`): a frame is untrusted, and a
//! value tree turns a 16 MiB frame of one-byte items into ~16 million heap nodes (hundreds of
//! MiB). [`minicbor::Decoder`] reads items in place and borrows strings from the frame, and it
//! checks every declared length against the bytes actually present before it slices, so nothing
//! is allocated from a length field. What this module adds:
//!
//! - [`Reader::skip`], which skips a whole item without building it and bounds nesting to
//!   [`MAX_DEPTH`] levels. `Decoder::skip` is not used: it keeps an unbounded heap stack for
//!   nested indefinite containers and accepts a stray break (`ff`) as an item.
//! - [`Reader::map_entries`], which hands out each entry of a map as a text key and the raw
//!   encoding of its value, so a message is located first and parsed field by field after.
//! - [`Reader::text`] and [`Reader::bytes`], which join indefinite-length strings (borrowed
//!   otherwise), and `?`-friendly errors as [`ProtocolError::Cbor`].
//!
//! What `cbor-x` (the JS encoder) really emits is all accepted by `minicbor`: non-minimal length
//! headers (`b9 00 04`), `undefined` (`f7`), floats for integers (half floats with the `half`
//! feature), tags (looked through here) and indefinite-length items. Text strings must be valid
//! UTF-8 wherever they are, skipped ones and map keys included, as `minicbor` checks them: JS
//! peers only put ASCII ids in the text fields of a frame.

use std::borrow::Cow;

use minicbor::Decoder;
use minicbor::data::Type;

use super::message::ProtocolError;

/// Deepest nesting of arrays/maps accepted anywhere in a frame (the top-level map is depth 1).
/// Real frames nest at most 4 deep (`remote-heads-changed.newHeads.<storageId>.heads`); the
/// bound keeps the skip stack (and a caller's recursion through nested maps) tiny.
pub(super) const MAX_DEPTH: usize = 32;

fn err(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::Cbor(msg.into())
}

fn cbor(e: minicbor::decode::Error) -> ProtocolError {
    err(e.to_string())
}

fn too_deep() -> ProtocolError {
    err(format!("nesting deeper than {MAX_DEPTH}"))
}

/// Null and undefined both mean "absent" in JS (`{storageId: undefined}` is how an ephemeral
/// peer says it has no storage id).
pub(super) fn is_nil(ty: Type) -> bool {
    matches!(ty, Type::Null | Type::Undefined)
}

/// An array or map being skipped: how many items (keys and values) are left, or how many were
/// seen so far in an indefinite one (whose break may only come after whole entries).
#[derive(Debug, Clone, Copy)]
enum Open {
    Definite { left: u64 },
    Indefinite { map: bool, seen: u64 },
}

/// A [`minicbor::Decoder`] whose errors are [`ProtocolError`]s.
#[derive(Debug)]
pub(super) struct Reader<'b>(Decoder<'b>);

impl<'b> Reader<'b> {
    pub(super) fn new(buf: &'b [u8]) -> Self {
        Reader(Decoder::new(buf))
    }

    pub(super) fn is_at_end(&self) -> bool {
        self.0.position() >= self.0.input().len()
    }

    fn remaining(&self) -> u64 {
        self.0.input().len().saturating_sub(self.0.position()) as u64
    }

    /// The type of the next item, after any tags in front of it, which are consumed: tags carry
    /// no meaning in this protocol, and a client may tag a byte string as a typed array.
    pub(super) fn untagged(&mut self) -> Result<Type, ProtocolError> {
        loop {
            match self.0.datatype().map_err(cbor)? {
                Type::Tag => {
                    self.0.tag().map_err(cbor)?;
                }
                ty => return Ok(ty),
            }
        }
    }

    /// Consumes the break that [`Reader::untagged`] or `datatype` just reported.
    fn consume_break(&mut self) -> Result<(), ProtocolError> {
        // minicbor has no call that reads a break on its own; it is the one byte `ff`.
        match self.0.datatype().map_err(cbor)? {
            Type::Break => {
                self.0.set_position(self.0.position() + 1);
                Ok(())
            }
            other => Err(err(format!("expected break, found {other}"))),
        }
    }

    fn at_break(&self) -> Result<bool, ProtocolError> {
        Ok(self.0.datatype().map_err(cbor)? == Type::Break)
    }

    /// A text string, definite or indefinite; must be valid UTF-8. Borrowed from the input unless
    /// it was sent in chunks.
    pub(super) fn text(&mut self) -> Result<Cow<'b, str>, ProtocolError> {
        if self.0.datatype().map_err(cbor)? == Type::String {
            return self.0.str().map(Cow::Borrowed).map_err(cbor);
        }
        let mut out = String::new();
        for chunk in self.0.str_iter().map_err(cbor)? {
            out.push_str(chunk.map_err(cbor)?);
        }
        Ok(Cow::Owned(out))
    }

    /// A byte string, definite or indefinite. Borrowed unless it was sent in chunks.
    pub(super) fn bytes(&mut self) -> Result<Cow<'b, [u8]>, ProtocolError> {
        if self.0.datatype().map_err(cbor)? == Type::Bytes {
            return self.0.bytes().map(Cow::Borrowed).map_err(cbor);
        }
        let mut out = Vec::new();
        for chunk in self.0.bytes_iter().map_err(cbor)? {
            out.extend_from_slice(chunk.map_err(cbor)?);
        }
        Ok(out.into())
    }

    pub(super) fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.0.u64().map_err(cbor)
    }

    /// Any float, half precision included.
    pub(super) fn f64(&mut self) -> Result<f64, ProtocolError> {
        self.0.f64().map_err(cbor)
    }

    pub(super) fn bool(&mut self) -> Result<bool, ProtocolError> {
        self.0.bool().map_err(cbor)
    }

    /// Reads an array header: the number of items, `None` if indefinite (ends at a break).
    pub(super) fn array(&mut self) -> Result<Option<u64>, ProtocolError> {
        self.0.array().map_err(cbor)
    }

    /// Reads a map header: the number of entries, `None` if indefinite (ends at a break).
    pub(super) fn map(&mut self) -> Result<Option<u64>, ProtocolError> {
        self.0.map().map_err(cbor)
    }

    /// Skips one complete data item (and any tags in front of it) without building it.
    /// `depth` is the nesting level of the item; an array or map deeper than [`MAX_DEPTH`] is
    /// refused. Iterative: the only state is one small entry per open container.
    pub(super) fn skip(&mut self, depth: usize) -> Result<(), ProtocolError> {
        let mut open: Vec<Open> = Vec::new();
        loop {
            // Close finished containers, and count the item about to be read against its parent.
            match open.last_mut() {
                Some(Open::Definite { left: 0 }) => {
                    open.pop();
                    if open.is_empty() {
                        return Ok(());
                    }
                    continue;
                }
                Some(Open::Definite { left }) => *left -= 1,
                Some(Open::Indefinite { map, seen }) => {
                    if self.at_break()? {
                        if *map && *seen % 2 == 1 {
                            return Err(err("break between a map key and its value"));
                        }
                        self.consume_break()?;
                        open.pop();
                        if open.is_empty() {
                            return Ok(());
                        }
                        continue;
                    }
                    *seen += 1;
                }
                None => {}
            }
            let container = match self.untagged()? {
                Type::Array | Type::ArrayIndef => Some((false, self.array()?)),
                Type::Map | Type::MapIndef => Some((true, self.map()?)),
                Type::Break => return Err(err("unexpected break")),
                Type::Unknown(byte) => {
                    return Err(err(format!("reserved initial byte {byte:#04x}")));
                }
                scalar => {
                    self.skip_scalar(scalar).map_err(cbor)?;
                    None
                }
            };
            if let Some((map, len)) = container {
                if depth + open.len() > MAX_DEPTH {
                    return Err(too_deep());
                }
                open.push(match len {
                    Some(entries) => {
                        let left = if map {
                            entries.saturating_mul(2)
                        } else {
                            entries
                        };
                        // Every item takes at least one byte, so a count larger than what is
                        // left is a lie: refuse it now rather than at the end of the input.
                        if left > self.remaining() {
                            return Err(err("container claims more items than the input holds"));
                        }
                        Open::Definite { left }
                    }
                    None => Open::Indefinite { map, seen: 0 },
                });
            }
            if open.is_empty() {
                return Ok(());
            }
        }
    }

    /// Skips an item that is not an array or map: strings chunk by chunk, without copying.
    fn skip_scalar(&mut self, ty: Type) -> Result<(), minicbor::decode::Error> {
        let d = &mut self.0;
        match ty {
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => d.u64().map(drop),
            Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => d.int().map(drop),
            Type::F16 | Type::F32 | Type::F64 => d.f64().map(drop),
            Type::Bool => d.bool().map(drop),
            Type::Null => d.null(),
            Type::Undefined => d.undefined(),
            Type::Simple => d.simple().map(drop),
            Type::Bytes | Type::BytesIndef => d.bytes_iter()?.try_for_each(|c| c.map(drop)),
            Type::String | Type::StringIndef => d.str_iter()?.try_for_each(|c| c.map(drop)),
            // Containers are skipped by the caller; `untagged` has consumed any tag.
            Type::Tag
            | Type::Array
            | Type::ArrayIndef
            | Type::Map
            | Type::MapIndef
            | Type::Break
            | Type::Unknown(_) => Err(minicbor::decode::Error::type_mismatch(ty)),
        }
    }

    /// Calls `f(key, value)` for every entry of a map whose header ([`Reader::map`] → `len`) was
    /// just read, where `value` is the raw encoding of exactly one data item. Entries whose key
    /// is not a text string are skipped (JS objects only have string keys). `depth` is the
    /// nesting level of the map.
    pub(super) fn map_entries(
        &mut self,
        len: Option<u64>,
        depth: usize,
        mut f: impl FnMut(&str, &'b [u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        let mut left = len;
        loop {
            match left {
                Some(0) => return Ok(()),
                Some(n) => left = Some(n - 1),
                None if self.at_break()? => return self.consume_break(),
                None => {}
            }
            let key = match self.untagged()? {
                Type::String | Type::StringIndef => Some(self.text()?),
                _ => {
                    self.skip(depth + 1)?;
                    None
                }
            };
            let start = self.0.position();
            self.skip(depth + 1)?;
            let value = self
                .0
                .input()
                .get(start..self.0.position())
                .ok_or_else(|| err("unexpected end of input"))?;
            if let Some(key) = key {
                f(&key, value)?;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn one_item(bytes: &[u8]) -> Result<(), ProtocolError> {
        let mut r = Reader::new(bytes);
        r.skip(1)?;
        assert!(r.is_at_end(), "trailing bytes after one item");
        Ok(())
    }

    #[test]
    fn non_minimal_headers_are_read() {
        // The integer 5 in a 2-byte argument, "ab" with a 4-byte length, cbor-x's map16 header.
        assert_eq!(Reader::new(&[0x19, 0x00, 0x05]).u64().unwrap(), 5);
        assert_eq!(
            Reader::new(&[0x7a, 0, 0, 0, 2, b'a', b'b']).text().unwrap(),
            "ab"
        );
        assert_eq!(Reader::new(&[0xb9, 0x00, 0x04]).map().unwrap(), Some(4));
    }

    #[test]
    fn floats_of_every_width_are_read() {
        let cases: [(&[u8], f64); 6] = [
            (&[0xf9, 0x3c, 0x00], 1.0),
            (&[0xf9, 0x7b, 0xff], 65504.0),
            (&[0xf9, 0x00, 0x01], 5.960464477539063e-8),
            (&[0xf9, 0xc4, 0x00], -4.0),
            (&[0xf9, 0x7c, 0x00], f64::INFINITY),
            (&[0xfa, 0x47, 0xc3, 0x50, 0x00], 100000.0),
        ];
        for (bytes, expected) in cases {
            assert_eq!(Reader::new(bytes).f64().unwrap(), expected);
            one_item(bytes).unwrap();
        }
        // A millisecond timestamp, which cbor-x writes as float64.
        let ts = 1_732_617_000_000.0_f64;
        let bytes = [&[0xfb][..], &ts.to_be_bytes()].concat();
        assert_eq!(Reader::new(&bytes).f64().unwrap(), ts);
    }

    #[test]
    fn indefinite_strings_are_joined() {
        // (_ h'0102', h'03') and (_ "a", "bc")
        let mut r = Reader::new(&[0x5f, 0x42, 1, 2, 0x41, 3, 0xff]);
        assert_eq!(&*r.bytes().unwrap(), &[1, 2, 3]);
        assert!(r.is_at_end());
        let mut r = Reader::new(&[0x7f, 0x61, b'a', 0x62, b'b', b'c', 0xff]);
        assert_eq!(r.text().unwrap(), "abc");
        assert!(r.is_at_end());
        // A text chunk inside an indefinite byte string, and a nested indefinite chunk, are
        // malformed.
        assert!(Reader::new(&[0x5f, 0x61, b'a', 0xff]).bytes().is_err());
        assert!(one_item(&[0x5f, 0x61, b'a', 0xff]).is_err());
        assert!(Reader::new(&[0x7f, 0x7f, 0xff, 0xff]).text().is_err());
        // Unterminated.
        assert!(Reader::new(&[0x7f, 0x61, b'a']).text().is_err());
    }

    #[test]
    fn skip_handles_indefinite_containers_and_tags() {
        one_item(&[0x9f, 0x01, 0xbf, 0x61, b'k', 0xc1, 0x02, 0xff, 0xff]).unwrap();
        one_item(&[0xc0, 0xc0, 0xc0, 0x01]).unwrap();
        one_item(&[0x82, 0x9f, 0x9f, 0xff, 0xff, 0xa1, 0x80, 0xbf, 0xff]).unwrap();
        one_item(&[0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap();
        one_item(&[0xf8, 0xff]).unwrap();
    }

    #[test]
    fn skip_rejects_lies_and_garbage() {
        // Array claiming 2^64-1 items with none present.
        assert!(one_item(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        // Map claiming 2^63 entries (2^64 items: the count must not wrap).
        assert!(one_item(&[0xbb, 0x80, 0, 0, 0, 0, 0, 0, 0]).is_err());
        // Byte string claiming 4 GiB.
        assert!(one_item(&[0x5a, 0xff, 0xff, 0xff, 0xff, 0x00]).is_err());
        // Reserved additional information, and an indefinite integer.
        assert!(one_item(&[0x1c]).is_err());
        assert!(one_item(&[0x1f]).is_err());
        assert!(one_item(&[0xfc]).is_err());
        // A lone break, and a break inside a definite array.
        assert!(one_item(&[0xff]).is_err());
        assert!(one_item(&[0x82, 0x01, 0xff]).is_err());
        // Unterminated indefinite map, and one that breaks between a key and its value.
        assert!(one_item(&[0xbf, 0x01, 0x02]).is_err());
        assert!(one_item(&[0xbf, 0x01, 0xff]).is_err());
        // Tag with nothing after it.
        assert!(one_item(&[0xc0]).is_err());
        // Text that is not UTF-8.
        assert!(one_item(&[0x62, 0xc3, 0x28]).is_err());
    }

    #[test]
    fn nesting_is_bounded() {
        let mut deep = vec![0x81; MAX_DEPTH + 1];
        deep.push(0x00);
        assert!(one_item(&deep).is_err());
        let mut ok = vec![0x81; MAX_DEPTH];
        ok.push(0x00);
        one_item(&ok).unwrap();
        // A million indefinite arrays, or maps keyed by maps: must fail on depth, not exhaust
        // memory or the stack.
        assert!(one_item(&vec![0x9f; 1_000_000]).is_err());
        assert!(one_item(&vec![0xa1; 1_000_000]).is_err());
    }

    #[test]
    fn map_entries_yield_raw_values_and_skip_other_keys() {
        // {_ "a": [1, 2], 5: "x", "b": 7(null)}
        let bytes = [
            0xbf, 0x61, b'a', 0x82, 0x01, 0x02, 0x05, 0x61, b'x', 0x61, b'b', 0xc7, 0xf6, 0xff,
        ];
        let mut r = Reader::new(&bytes);
        let len = r.map().unwrap();
        let mut seen = Vec::new();
        r.map_entries(len, 1, |k, v| {
            seen.push((k.to_owned(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert!(r.is_at_end());
        assert_eq!(
            seen,
            [
                ("a".to_owned(), vec![0x82, 0x01, 0x02]),
                ("b".to_owned(), vec![0xc7, 0xf6]),
            ]
        );
    }
}
