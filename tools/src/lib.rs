//! Shared pieces of the command-line tools: how keys are printed and parsed, how errors are
//! reported, and the self-describing values the crash test writes.

pub mod bench;
pub mod http;
pub mod loadgen;
pub mod replay;

/// Shows a key as text when it is printable UTF-8, else as `0x` and hex.
pub fn display_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if !text.is_empty() && text.chars().all(|c| !c.is_control()) => text.to_owned(),
        _ => format!("0x{}", hex(key)),
    }
}

/// An error and its causes on one line, each said once. The project's errors put their
/// source's message in their own (`cannot connect: Connection refused`), so a cause whose
/// words the line already ends with is not repeated, as `{:#}` would.
pub fn report(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a key given on the command line: `0x` followed by hex digits is bytes, anything
/// else is the UTF-8 text itself.
///
/// # Errors
///
/// A message if the hex is malformed.
pub fn parse_key(text: &str) -> Result<Vec<u8>, String> {
    let Some(digits) = text.strip_prefix("0x") else {
        return Ok(text.as_bytes().to_vec());
    };
    if digits.len() % 2 != 0 {
        return Err(format!("hex key {text:?} has an odd number of digits"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16)
                .map_err(|_| format!("hex key {text:?} has a non-hex digit near position {i}"))
        })
        .collect()
}

/// The value the crash writer puts under `key`: 1 byte to 96 KiB, length and bytes a
/// function of the key alone, so that a reader can check any value it gets back without a
/// record of what was written.
pub fn crash_value(key: &[u8]) -> Vec<u8> {
    let mut state = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let len = 1 + (state % (96 << 10)) as usize;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&state.to_le_bytes()[..take]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_text_and_hex() {
        assert_eq!(parse_key("abc").unwrap(), b"abc");
        assert_eq!(parse_key("0x00ff10").unwrap(), vec![0, 255, 16]);
        assert!(parse_key("0x0").is_err());
        assert!(parse_key("0xzz").is_err());
        assert_eq!(display_key(b"abc"), "abc");
        assert_eq!(display_key(&[0, 255]), "0x00ff");
        assert_eq!(parse_key(&display_key(&[0, 255])).unwrap(), vec![0, 255]);
    }

    #[test]
    fn a_report_says_each_cause_once() {
        // As the client's errors: the source's message is already in the error's own.
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let words = refused.to_string();
        let error = anyhow::Error::new(refused)
            .context(format!("cannot connect to the node: {words}"))
            .context("cannot connect to the node at 127.0.0.1:1");
        assert_eq!(
            report(&error),
            format!(
                "cannot connect to the node at 127.0.0.1:1: cannot connect to the node: {words}"
            )
        );
        // A cause the error does not repeat is still said.
        let error = anyhow::anyhow!("no such file").context("cannot open data");
        assert_eq!(report(&error), "cannot open data: no such file");
    }

    #[test]
    fn crash_values_are_a_function_of_the_key() {
        assert_eq!(crash_value(b"a"), crash_value(b"a"));
        assert_ne!(crash_value(b"a"), crash_value(b"b"));
        assert!((1..=96 << 10).contains(&crash_value(b"some-key").len()));
    }
}

/// The README's and the docs' examples, compiled and run as doc tests (this crate depends on
/// every crate they use).
#[cfg(doctest)]
mod documentation {
    #[doc = include_str!("../../README.md")]
    struct Readme;
    #[doc = include_str!("../../docs/engine.md")]
    struct Engine;
    #[doc = include_str!("../../docs/node.md")]
    struct Node;
    #[doc = include_str!("../../docs/cluster.md")]
    struct Cluster;
    #[doc = include_str!("../../docs/features.md")]
    struct Features;
}
