//! The headers of a job message: the names jetinfer sets and reads, and the
//! limits every header of a job is screened against before a worker reads
//! any of them. Headers come from whoever published the job: the server
//! forwards a header block verbatim, so anything a raw `HPUB` can carry may
//! arrive here.

use crate::limits::MAX_JOB_ID_LEN;

/// Subject the worker publishes the [`crate::JobResult`] to.
pub const REPLY_TO: &str = "Jetinfer-Reply-To";
/// JetStream's de-duplication header; jetinfer sets it to the job id.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// W3C trace context of the submitting caller, carried into the worker's spans.
pub const TRACEPARENT: &str = "traceparent";
/// The bulk run a job belongs to (`jetinfer bulk`); workers answer jobs
/// of a cancelled run `cancelled` instead of computing them.
pub const BULK_RUN: &str = "Jetinfer-Bulk-Run";
/// Set by the NATS client jetinfer builds with (async-nats, patched in
/// `vendor/async-nats`) on a message whose header block held something that
/// cannot be a header: a line without `:`, a name outside ASCII 33-126, a
/// value with a CR or LF in it, bytes that are not UTF-8, a bad version or
/// status line. The offending line is left out; this header's value says
/// what it was, escaped. A job carrying it is refused. (A publisher can set
/// it too, which only gets its own job refused.)
pub const MALFORMED: &str = "Async-Nats-Malformed-Header";

/// The headers jetinfer reads from a job. Each may appear at most once: two
/// values would let the server (de-duplication) and the worker (reply,
/// run) read different ones.
pub const READ_ONCE: [&str; 4] = [REPLY_TO, MSG_ID, TRACEPARENT, BULK_RUN];

/// Largest header block a job may carry, counted as on the wire (`NATS/1.0`
/// line, `name: value` and CRLF per value, closing CRLF). What jetinfer
/// itself sets is under 650 bytes (a 189-byte id, a 256-byte reply subject,
/// a 55-byte traceparent, a 26-byte run id and their names); the rest leaves
/// room for the trace or routing headers a gateway adds.
pub const MAX_HEADER_BYTES: usize = 4096;
/// What a dead-letter replay appends to a job id in its `Nats-Msg-Id`
/// (`:replay:` and a stream sequence), at most.
pub const REPLAY_SUFFIX_MAX_LEN: usize = ":replay:".len() + 20;
/// Longest `Nats-Msg-Id`: a job id, its de-duplication tag, or a replay's
/// suffix in its place (the longer of the two counted twice: a bound).
pub const MAX_MSG_ID_LEN: usize = MAX_JOB_ID_LEN + DEDUP_TAG_LEN + REPLAY_SUFFIX_MAX_LEN;
/// Bytes a producer's de-duplication tag adds to a job id in `Nats-Msg-Id`
/// (`~` and 32 hex digits: `jetinfer_nats::publish::dedup_id`).
pub const DEDUP_TAG_LEN: usize = 33;

/// Bytes the header block's version line and closing blank line take.
const BLOCK_OVERHEAD: usize = "NATS/1.0\r\n\r\n".len();
/// Bytes a header line takes beside its name and value (`: ` and CRLF).
const LINE_OVERHEAD: usize = ": \r\n".len();

/// Whether `name` can be a header name: 1 or more bytes of ASCII 33-126
/// other than `:`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Whether `id` can be a `Nats-Msg-Id`: 1 to [`MAX_MSG_ID_LEN`] bytes of
/// printable ASCII without spaces (a job id, maybe with a replay suffix).
pub fn valid_msg_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_MSG_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The first control character in `value` (C0, DEL or C1), if any.
pub fn control_char(value: &str) -> Option<char> {
    value.chars().find(|c| c.is_control())
}

/// Bytes a header line with `name` and `value` takes on the wire.
pub fn line_bytes(name: &str, value: &str) -> usize {
    name.len() + value.len() + LINE_OVERHEAD
}

/// Bytes of a header block whose lines take `lines` bytes.
pub fn block_bytes(lines: usize) -> usize {
    lines.saturating_add(BLOCK_OVERHEAD)
}

/// `Nats-Msg-Id` for replaying the job `job_id`, dead letter `sequence`:
/// the job id with one replay suffix (a replayed job replayed again keeps
/// one suffix, so the id stays within [`MAX_MSG_ID_LEN`]).
pub fn replay_msg_id(job_id: &str, sequence: u64) -> String {
    let base = match job_id.rsplit_once(":replay:") {
        Some((base, seq)) if !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => job_id,
    };
    format!("{base}:replay:{sequence}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_printable_ascii_without_a_colon() {
        assert!(valid_name("X-Anything"));
        assert!(valid_name("!~"));
        for bad in ["", "X Any", "X:A", "X\u{1}A", "X\u{7f}", "é", "X\rA"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn control_characters_include_del_and_c1() {
        assert_eq!(control_char("plain text, ünïcode"), None);
        for (value, c) in [
            ("a\u{1b}[2J", '\u{1b}'),
            ("\0", '\0'),
            ("tab\t", '\t'),
            ("x\u{7f}", '\u{7f}'),
            ("x\u{85}", '\u{85}'),
        ] {
            assert_eq!(control_char(value), Some(c));
        }
    }

    #[test]
    fn a_replayed_id_keeps_one_suffix_and_fits() {
        let id = "j".repeat(MAX_JOB_ID_LEN);
        let once = replay_msg_id(&id, 7);
        assert_eq!(once, format!("{id}:replay:7"));
        let twice = replay_msg_id(&once, u64::MAX);
        assert_eq!(twice, format!("{id}:replay:{}", u64::MAX));
        assert!(twice.len() <= MAX_MSG_ID_LEN);
        let tagged = format!("{id}~{}", "f".repeat(DEDUP_TAG_LEN - 1));
        assert!(
            valid_msg_id(&tagged),
            "a tagged id of the longest job id fits"
        );
        assert_eq!(
            replay_msg_id("run:doc:replay:x", 2),
            "run:doc:replay:x:replay:2"
        );
    }
}
