//! UTF-16 positions at the text API.
//!
//! Native text fields (Swift `NSString`, Kotlin `String`) count UTF-16 code units, and so does
//! automerge-repo in JavaScript. Documents are created and loaded with
//! [`automerge::TextEncoding::Utf16CodeUnit`], so automerge indexes text in the same unit; this
//! module only validates ranges so a splice never cuts a surrogate pair in half, which would
//! store half a character.

use crate::{Error, Result};

/// Check that `pos..pos+len` (UTF-16 code units) lies inside `text` and on character
/// boundaries.
pub fn check_utf16_range(text: &str, pos: usize, len: usize) -> Result<()> {
    let text_len: usize = text.chars().map(char::len_utf16).sum();
    let bad = || Error::InvalidTextRange { pos, len, text_len };
    let end = pos.checked_add(len).ok_or_else(bad)?;
    if end > text_len {
        return Err(bad());
    }
    if !is_boundary(text, pos) || !is_boundary(text, end) {
        return Err(bad());
    }
    Ok(())
}

/// Whether UTF-16 offset `at` falls between two characters of `text`.
fn is_boundary(text: &str, at: usize) -> bool {
    let mut units = 0;
    for c in text.chars() {
        if units == at {
            return true;
        }
        if units > at {
            return false;
        }
        units += c.len_utf16();
    }
    units == at
}

/// Length of `s` in UTF-16 code units.
pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// Convert a Unicode code point offset into a UTF-16 offset within `text`.
///
/// Editing traces and some import formats count code points; the store counts UTF-16 units.
pub fn code_points_to_utf16(text: &str, code_points: usize) -> Option<usize> {
    let mut units = 0;
    let mut chars = text.chars();
    for _ in 0..code_points {
        units += chars.next()?.len_utf16();
    }
    Some(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_outside_the_bmp_count_two_units() {
        let t = "a😀b";
        assert_eq!(utf16_len(t), 4);
        assert!(check_utf16_range(t, 1, 2).is_ok());
        assert!(
            check_utf16_range(t, 2, 1).is_err(),
            "splits the surrogate pair"
        );
        assert!(check_utf16_range(t, 4, 0).is_ok());
        assert!(check_utf16_range(t, 4, 1).is_err());
        assert!(check_utf16_range(t, usize::MAX, 2).is_err());
        assert_eq!(code_points_to_utf16(t, 2), Some(3));
        assert_eq!(code_points_to_utf16(t, 4), None);
    }
}
