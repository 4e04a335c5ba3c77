//! Just enough CBOR (RFC 8949) for automerge-repo frames: a reader over a byte slice and a
//! minimal writer.
//!
//! Why not `ciborium::Value`: a frame is untrusted, and a generic value tree turns a 16 MiB frame
//! of one-byte items into ~16 million heap nodes (hundreds of MiB). This reader never allocates
//! for data it skips, never trusts a declared length beyond the bytes actually present, and
//! bounds nesting, so the cost of decoding is linear in the frame and allocation is bounded by
//! the fields we keep. It also accepts what the JS `cbor-x` encoder really emits: non-minimal
//! length headers (`b9 00 04`), `undefined` (`f7`), floats for integers, tags, and
//! indefinite-length items.

use std::borrow::Cow;

use super::message::ProtocolError;

/// Deepest nesting of arrays/maps accepted anywhere in a frame (the top-level map is depth 1).
/// Real frames nest at most 4 deep (`remote-heads-changed.newHeads.<storageId>.heads`); the
/// bound keeps the recursive skip far from stack exhaustion on hostile input.
pub(super) const MAX_DEPTH: usize = 32;

const MAJOR_UINT: u8 = 0;
const MAJOR_NINT: u8 = 1;
const MAJOR_BYTES: u8 = 2;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_MAP: u8 = 5;
const MAJOR_TAG: u8 = 6;
const MAJOR_SIMPLE: u8 = 7;

const BREAK: u8 = 0xff;

/// One CBOR data item header; the content of strings, arrays and maps follows it in the input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Item {
    Uint(u64),
    /// The value is `-1 - n`.
    Nint(u64),
    /// Length in bytes; `None` = indefinite (a sequence of definite chunks ended by a break).
    Bytes(Option<u64>),
    Text(Option<u64>),
    /// Number of items; `None` = indefinite.
    Array(Option<u64>),
    /// Number of key/value pairs; `None` = indefinite.
    Map(Option<u64>),
    Tag(u64),
    Bool(bool),
    Null,
    Undefined,
    Simple(u8),
    Float(f64),
    Break,
}

impl Item {
    /// Null and undefined both mean "absent" in JS (`{storageId: undefined}` is how an
    /// ephemeral peer says it has no storage id).
    pub(super) fn is_nil(self) -> bool {
        matches!(self, Item::Null | Item::Undefined)
    }

    pub(super) fn describe(self) -> &'static str {
        match self {
            Item::Uint(_) => "unsigned integer",
            Item::Nint(_) => "negative integer",
            Item::Bytes(_) => "byte string",
            Item::Text(_) => "text string",
            Item::Array(_) => "array",
            Item::Map(_) => "map",
            Item::Tag(_) => "tag",
            Item::Bool(_) => "bool",
            Item::Null => "null",
            Item::Undefined => "undefined",
            Item::Simple(_) => "simple value",
            Item::Float(_) => "float",
            Item::Break => "break",
        }
    }
}

fn err(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::Cbor(msg.into())
}

fn truncated() -> ProtocolError {
    err("unexpected end of input")
}

#[derive(Debug)]
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(super) fn is_at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.remaining() {
            return Err(truncated());
        }
        let start = self.pos;
        self.pos += n;
        self.buf.get(start..self.pos).ok_or_else(truncated)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let bytes = self.take(N)?;
        bytes.try_into().map_err(|_| truncated())
    }

    fn peek_is_break(&self) -> bool {
        self.buf.get(self.pos) == Some(&BREAK)
    }

    /// The argument of a header: `Some(value)`, or `None` for the indefinite marker (31).
    /// Non-minimal encodings (a 2-byte length that would fit in 1) are accepted on purpose.
    fn argument(&mut self, info: u8) -> Result<Option<u64>, ProtocolError> {
        Ok(Some(match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.take_array::<1>()?[0]),
            25 => u64::from(u16::from_be_bytes(self.take_array()?)),
            26 => u64::from(u32::from_be_bytes(self.take_array()?)),
            27 => u64::from_be_bytes(self.take_array()?),
            31 => return Ok(None),
            _ => return Err(err(format!("reserved additional information {info}"))),
        }))
    }

    /// Reads one header. Content (string bytes, array items) is left in the input.
    pub(super) fn item(&mut self) -> Result<Item, ProtocolError> {
        let initial = self.take_array::<1>()?[0];
        let major = initial >> 5;
        let info = initial & 0x1f;
        if major == MAJOR_SIMPLE {
            return self.simple_or_float(info);
        }
        let arg = self.argument(info)?;
        let definite = |what: &str| {
            arg.ok_or_else(|| err(format!("indefinite length is not allowed for {what}")))
        };
        Ok(match major {
            MAJOR_UINT => Item::Uint(definite("an integer")?),
            MAJOR_NINT => Item::Nint(definite("an integer")?),
            MAJOR_BYTES => Item::Bytes(arg),
            MAJOR_TEXT => Item::Text(arg),
            MAJOR_ARRAY => Item::Array(arg),
            MAJOR_MAP => Item::Map(arg),
            MAJOR_TAG => Item::Tag(definite("a tag")?),
            _ => return Err(err("invalid major type")),
        })
    }

    fn simple_or_float(&mut self, info: u8) -> Result<Item, ProtocolError> {
        Ok(match info {
            20 => Item::Bool(false),
            21 => Item::Bool(true),
            22 => Item::Null,
            23 => Item::Undefined,
            0..=19 => Item::Simple(info),
            24 => Item::Simple(self.take_array::<1>()?[0]),
            25 => Item::Float(f16_to_f64(u16::from_be_bytes(self.take_array()?))),
            26 => Item::Float(f64::from(f32::from_be_bytes(self.take_array()?))),
            27 => Item::Float(f64::from_be_bytes(self.take_array()?)),
            31 => Item::Break,
            _ => return Err(err(format!("reserved simple value {info}"))),
        })
    }

    /// Reads a header, looking through any tags: tags carry no meaning in this protocol, and a
    /// client may tag a byte string as a typed array.
    pub(super) fn item_untagged(&mut self) -> Result<Item, ProtocolError> {
        loop {
            match self.item()? {
                Item::Tag(_) => continue,
                item => return Ok(item),
            }
        }
    }

    /// The content of a byte string whose header was just read. Borrowed unless the string was
    /// sent in indefinite-length chunks.
    pub(super) fn bytes_content(
        &mut self,
        len: Option<u64>,
    ) -> Result<Cow<'a, [u8]>, ProtocolError> {
        self.string_content(MAJOR_BYTES, len)
    }

    /// The content of a text string whose header was just read; must be valid UTF-8.
    pub(super) fn text_content(&mut self, len: Option<u64>) -> Result<Cow<'a, str>, ProtocolError> {
        match self.string_content(MAJOR_TEXT, len)? {
            Cow::Borrowed(b) => std::str::from_utf8(b)
                .map(Cow::Borrowed)
                .map_err(|_| err("text string is not valid UTF-8")),
            Cow::Owned(v) => String::from_utf8(v)
                .map(Cow::Owned)
                .map_err(|_| err("text string is not valid UTF-8")),
        }
    }

    fn definite_len(&self, len: u64) -> Result<usize, ProtocolError> {
        // A declared length is only believed once the bytes are there: nothing is allocated
        // from a length field alone.
        match usize::try_from(len) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(truncated()),
        }
    }

    fn string_content(
        &mut self,
        major: u8,
        len: Option<u64>,
    ) -> Result<Cow<'a, [u8]>, ProtocolError> {
        if let Some(len) = len {
            let n = self.definite_len(len)?;
            return self.take(n).map(Cow::Borrowed);
        }
        let mut out = Vec::new();
        loop {
            let initial = self.take_array::<1>()?[0];
            if initial == BREAK {
                return Ok(Cow::Owned(out));
            }
            // RFC 8949 §3.2.3: chunks are definite-length strings of the same major type.
            if initial >> 5 != major {
                return Err(err("indefinite-length string chunk of the wrong type"));
            }
            let chunk_len = self
                .argument(initial & 0x1f)?
                .ok_or_else(|| err("nested indefinite-length string"))?;
            let n = self.definite_len(chunk_len)?;
            out.extend_from_slice(self.take(n)?);
        }
    }

    /// Skips one complete data item (including any tags in front of it).
    /// `depth` is the nesting level of the item being skipped.
    pub(super) fn skip(&mut self, depth: usize) -> Result<(), ProtocolError> {
        let item = self.item_untagged()?;
        self.skip_content(item, depth)
    }

    /// Skips the content that follows `item`'s header.
    pub(super) fn skip_content(&mut self, item: Item, depth: usize) -> Result<(), ProtocolError> {
        match item {
            Item::Bytes(len) => self.skip_string(MAJOR_BYTES, len),
            Item::Text(len) => self.skip_string(MAJOR_TEXT, len),
            Item::Array(len) => self.skip_items(len, 1, depth),
            Item::Map(len) => self.skip_items(len, 2, depth),
            Item::Break => Err(err("unexpected break")),
            Item::Uint(_)
            | Item::Nint(_)
            | Item::Tag(_)
            | Item::Bool(_)
            | Item::Null
            | Item::Undefined
            | Item::Simple(_)
            | Item::Float(_) => Ok(()),
        }
    }

    fn skip_string(&mut self, major: u8, len: Option<u64>) -> Result<(), ProtocolError> {
        if let Some(len) = len {
            let n = self.definite_len(len)?;
            return self.take(n).map(|_| ());
        }
        loop {
            let initial = self.take_array::<1>()?[0];
            if initial == BREAK {
                return Ok(());
            }
            if initial >> 5 != major {
                return Err(err("indefinite-length string chunk of the wrong type"));
            }
            let chunk_len = self
                .argument(initial & 0x1f)?
                .ok_or_else(|| err("nested indefinite-length string"))?;
            let n = self.definite_len(chunk_len)?;
            self.take(n)?;
        }
    }

    /// Skips the items of an array (`per_entry` 1) or map (`per_entry` 2) at nesting `depth`.
    fn skip_items(
        &mut self,
        len: Option<u64>,
        per_entry: u64,
        depth: usize,
    ) -> Result<(), ProtocolError> {
        if depth > MAX_DEPTH {
            return Err(err(format!("nesting deeper than {MAX_DEPTH}")));
        }
        match len {
            Some(n) => {
                // Every item takes at least one byte, so a count larger than what is left is
                // a lie; reject it up front instead of looping to the end of the input.
                let items = n.saturating_mul(per_entry);
                if items > self.remaining() as u64 {
                    return Err(truncated());
                }
                for _ in 0..items {
                    self.skip(depth + 1)?;
                }
                Ok(())
            }
            None => loop {
                if self.peek_is_break() {
                    self.pos += 1;
                    return Ok(());
                }
                for _ in 0..per_entry {
                    self.skip(depth + 1)?;
                }
            },
        }
    }

    /// Calls `f(key, value)` for every entry of a map whose header (`Item::Map(len)`) was just
    /// read, where `value` is the raw encoding of exactly one data item. Entries whose key is not
    /// a text string are skipped (JS objects only have string keys). `depth` is the nesting
    /// level of the map.
    pub(super) fn map_entries(
        &mut self,
        len: Option<u64>,
        depth: usize,
        mut f: impl FnMut(&str, &'a [u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        if depth > MAX_DEPTH {
            return Err(err(format!("nesting deeper than {MAX_DEPTH}")));
        }
        let mut left = len;
        loop {
            match left {
                Some(0) => return Ok(()),
                Some(n) => left = Some(n - 1),
                None if self.peek_is_break() => {
                    self.pos += 1;
                    return Ok(());
                }
                None => {}
            }
            let key_item = self.item_untagged()?;
            let key = match key_item {
                // A key that is not valid UTF-8 cannot name a field we know: it is an unknown
                // key, not an error. A truncated key still is an error.
                Item::Text(len) => match self.string_content(MAJOR_TEXT, len)? {
                    Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
                    Cow::Owned(v) => String::from_utf8(v).ok().map(Cow::Owned),
                },
                other => {
                    self.skip_content(other, depth + 1)?;
                    None
                }
            };
            let start = self.pos;
            self.skip(depth + 1)?;
            let value = self.buf.get(start..self.pos).ok_or_else(truncated)?;
            if let Some(key) = key {
                f(&key, value)?;
            }
        }
    }
}

/// IEEE 754 half precision to f64 (RFC 8949 Appendix D).
fn f16_to_f64(half: u16) -> f64 {
    let exponent = i32::from((half >> 10) & 0x1f);
    let mantissa = f64::from(half & 0x3ff);
    let magnitude = match exponent {
        0 => mantissa * 2f64.powi(-24),
        31 if mantissa == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (mantissa + 1024.0) * 2f64.powi(exponent - 25),
    };
    if half & 0x8000 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Writes definite-length, minimally encoded CBOR, which every decoder (cbor-x included) reads.
#[derive(Debug, Default)]
pub(super) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(super) fn new() -> Self {
        Writer::default()
    }

    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn header(&mut self, major: u8, arg: u64) {
        let major = major << 5;
        if arg < 24 {
            self.buf.push(major | arg as u8);
        } else if let Ok(a) = u8::try_from(arg) {
            self.buf.extend_from_slice(&[major | 24, a]);
        } else if let Ok(a) = u16::try_from(arg) {
            self.buf.push(major | 25);
            self.buf.extend_from_slice(&a.to_be_bytes());
        } else if let Ok(a) = u32::try_from(arg) {
            self.buf.push(major | 26);
            self.buf.extend_from_slice(&a.to_be_bytes());
        } else {
            self.buf.push(major | 27);
            self.buf.extend_from_slice(&arg.to_be_bytes());
        }
    }

    pub(super) fn map(&mut self, entries: usize) -> &mut Self {
        self.header(MAJOR_MAP, entries as u64);
        self
    }

    pub(super) fn array(&mut self, items: usize) -> &mut Self {
        self.header(MAJOR_ARRAY, items as u64);
        self
    }

    pub(super) fn text(&mut self, s: &str) -> &mut Self {
        self.header(MAJOR_TEXT, s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    pub(super) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.header(MAJOR_BYTES, b.len() as u64);
        self.buf.extend_from_slice(b);
        self
    }

    pub(super) fn uint(&mut self, n: u64) -> &mut Self {
        self.header(MAJOR_UINT, n);
        self
    }

    pub(super) fn bool(&mut self, b: bool) -> &mut Self {
        self.buf.push(if b { 0xf5 } else { 0xf4 });
        self
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
    fn writer_uses_minimal_headers() {
        let mut w = Writer::new();
        w.uint(23)
            .uint(24)
            .uint(255)
            .uint(256)
            .uint(65_536)
            .uint(1 << 32);
        assert_eq!(
            w.into_bytes(),
            [
                &[0x17][..],
                &[0x18, 24],
                &[0x18, 0xff],
                &[0x19, 0x01, 0x00],
                &[0x1a, 0x00, 0x01, 0x00, 0x00],
                &[0x1b, 0, 0, 0, 1, 0, 0, 0, 0],
            ]
            .concat()
        );
    }

    #[test]
    fn reader_accepts_non_minimal_headers() {
        // 0x19 0x00 0x05: the integer 5 in a 2-byte argument.
        let mut r = Reader::new(&[0x19, 0x00, 0x05]);
        assert_eq!(r.item().unwrap(), Item::Uint(5));
        // Text "ab" with a 4-byte length.
        let mut r = Reader::new(&[0x7a, 0, 0, 0, 2, b'a', b'b']);
        let Item::Text(len) = r.item().unwrap() else {
            panic!()
        };
        assert_eq!(r.text_content(len).unwrap(), "ab");
    }

    #[test]
    fn reader_decodes_floats_of_every_width() {
        let cases: [(&[u8], f64); 4] = [
            (&[0xf9, 0x3c, 0x00], 1.0),
            (&[0xf9, 0x7b, 0xff], 65504.0),
            (&[0xf9, 0x00, 0x01], 5.960464477539063e-8),
            (&[0xfa, 0x47, 0xc3, 0x50, 0x00], 100000.0),
        ];
        for (bytes, expected) in cases {
            assert_eq!(Reader::new(bytes).item().unwrap(), Item::Float(expected));
        }
        // A millisecond timestamp, which cbor-x writes as float64.
        let ts = 1_732_617_000_000.0_f64;
        let bytes = [&[0xfb][..], &ts.to_be_bytes()].concat();
        assert_eq!(Reader::new(&bytes).item().unwrap(), Item::Float(ts));
        assert_eq!(
            Reader::new(&[0xf9, 0xc4, 0x00]).item().unwrap(),
            Item::Float(-4.0)
        );
        assert_eq!(
            Reader::new(&[0xf9, 0x7c, 0x00]).item().unwrap(),
            Item::Float(f64::INFINITY)
        );
    }

    #[test]
    fn indefinite_strings_are_joined() {
        // (_ h'0102', h'03') and (_ "a", "bc")
        let mut r = Reader::new(&[0x5f, 0x42, 1, 2, 0x41, 3, 0xff]);
        let Item::Bytes(len) = r.item().unwrap() else {
            panic!()
        };
        assert_eq!(&*r.bytes_content(len).unwrap(), &[1, 2, 3]);
        let mut r = Reader::new(&[0x7f, 0x61, b'a', 0x62, b'b', b'c', 0xff]);
        let Item::Text(len) = r.item().unwrap() else {
            panic!()
        };
        assert_eq!(r.text_content(len).unwrap(), "abc");
        // A text chunk inside an indefinite byte string is malformed.
        let mut r = Reader::new(&[0x5f, 0x61, b'a', 0xff]);
        let Item::Bytes(len) = r.item().unwrap() else {
            panic!()
        };
        assert!(r.bytes_content(len).is_err());
    }

    #[test]
    fn skip_handles_indefinite_containers_and_tags() {
        one_item(&[0x9f, 0x01, 0xbf, 0x61, b'k', 0xc1, 0x02, 0xff, 0xff]).unwrap();
        one_item(&[0xc0, 0xc0, 0xc0, 0x01]).unwrap();
    }

    #[test]
    fn skip_rejects_lies_and_garbage() {
        // Array claiming 2^64-1 items with none present.
        assert!(one_item(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        // Byte string claiming 4 GiB.
        assert!(one_item(&[0x5a, 0xff, 0xff, 0xff, 0xff, 0x00]).is_err());
        // Reserved additional information.
        assert!(one_item(&[0x1c]).is_err());
        // A lone break.
        assert!(one_item(&[0xff]).is_err());
        // Unterminated indefinite map.
        assert!(one_item(&[0xbf, 0x01, 0x02]).is_err());
        // Tag with nothing after it.
        assert!(one_item(&[0xc0]).is_err());
    }

    #[test]
    fn nesting_is_bounded() {
        let mut deep = vec![0x81; MAX_DEPTH + 1];
        deep.push(0x00);
        assert!(one_item(&deep).is_err());
        let mut ok = vec![0x81; MAX_DEPTH - 1];
        ok.push(0x00);
        one_item(&ok).unwrap();
        // A million indefinite arrays: must fail on depth, not blow the stack.
        assert!(one_item(&vec![0x9f; 1_000_000]).is_err());
    }
}
