//! UTF-16 positions at the text API.
//!
//! Native text fields (Swift `NSString`, Kotlin `String`) count UTF-16 code units, and so does
//! automerge-repo in JavaScript. Documents are created and loaded with
//! [`automerge::TextEncoding::Utf16CodeUnit`], so automerge indexes text in the same unit. What
//! automerge does not do is refuse an offset inside a surrogate pair: it silently rounds, so a
//! delete of "half an emoji" removes the whole character. A splice must be refused instead, so
//! this module checks that both ends of a range fall on character boundaries.

use std::collections::HashMap;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ReadDoc};

use crate::{Error, Result};

/// Whether `pos` (UTF-16 units) lies on a character boundary of Text `obj`. A cursor taken at
/// `pos` points at the character containing it; if that character starts before `pos`, `pos`
/// is inside a surrogate pair.
fn is_boundary(doc: &AutoCommit, obj: &ObjId, pos: usize, len: usize) -> Result<bool> {
    if pos == 0 || pos >= len {
        return Ok(pos <= len);
    }
    let cursor = doc.get_cursor(obj, pos, None)?;
    Ok(doc.get_cursor_position(obj, &cursor, None)? == pos)
}

/// At UTF-16 offset `pos` of Text `obj`, delete `delete` units and insert `insert`, refusing
/// ranges outside the text or splitting a surrogate pair. `bmp_only` caches, per Text object,
/// whether it holds only Basic Multilingual Plane characters (then every offset is a boundary);
/// the caller clears it whenever the document merges foreign changes.
pub(crate) fn splice(
    doc: &mut AutoCommit,
    obj: &ObjId,
    pos: usize,
    delete: usize,
    insert: &str,
    bmp_only: &mut HashMap<ObjId, bool>,
) -> Result<()> {
    let len = doc.length(obj);
    let bad = || Error::InvalidTextRange {
        pos,
        len: delete,
        text_len: len,
    };
    let end = pos
        .checked_add(delete)
        .filter(|end| *end <= len)
        .ok_or_else(bad)?;
    let only_bmp = match bmp_only.get(obj) {
        Some(known) => *known,
        None => {
            let known = !has_surrogates(&doc.text(obj)?);
            bmp_only.insert(obj.clone(), known);
            known
        }
    };
    if !(only_bmp || is_boundary(doc, obj, pos, len)? && is_boundary(doc, obj, end, len)?) {
        return Err(bad());
    }
    let delete = isize::try_from(delete).map_err(|_| bad())?;
    doc.splice_text(obj, pos, delete, insert)?;
    if has_surrogates(insert) {
        bmp_only.insert(obj.clone(), false);
    }
    Ok(())
}

fn has_surrogates(s: &str) -> bool {
    s.chars().any(|c| c.len_utf16() == 2)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use automerge::{ObjType, ROOT, TextEncoding};

    #[test]
    fn offsets_inside_a_surrogate_pair_are_refused() {
        let mut doc = AutoCommit::new_with_encoding(TextEncoding::Utf16CodeUnit);
        let t = doc.put_object(ROOT, "t", ObjType::Text).unwrap();
        let mut cache = HashMap::new();
        splice(&mut doc, &t, 0, 0, "a😀b", &mut cache).unwrap();
        assert_eq!("a😀b".encode_utf16().count(), 4);
        assert_eq!(cache.get(&t), Some(&false));
        assert!(
            splice(&mut doc, &t, 2, 0, "x", &mut cache).is_err(),
            "insert inside the pair"
        );
        assert!(
            splice(&mut doc, &t, 1, 1, "", &mut cache).is_err(),
            "delete half the pair"
        );
        assert!(
            splice(&mut doc, &t, 2, 1, "", &mut cache).is_err(),
            "delete the other half"
        );
        assert!(
            splice(&mut doc, &t, 4, 1, "", &mut cache).is_err(),
            "past the end"
        );
        assert!(
            splice(&mut doc, &t, usize::MAX, 2, "", &mut cache).is_err(),
            "overflow"
        );
        assert_eq!(
            doc.text(&t).unwrap(),
            "a😀b",
            "refused splices change nothing"
        );
        splice(&mut doc, &t, 1, 2, "é", &mut cache).unwrap();
        splice(&mut doc, &t, 3, 0, "!", &mut cache).unwrap();
        assert_eq!(doc.text(&t).unwrap(), "aéb!");
    }
}
