//! Reading the input file: one JSON object per line, validated line by line
//! on a blocking thread and handed over through a bounded channel, so memory
//! holds a channel's worth of lines, never the file.
//!
//! A line is `{"custom_id": "...", "text": "..."}` or with `"texts": [...]`,
//! optionally `"model"` and `"options"` (`normalize`, `truncation`). A line
//! that breaks a rule is refused with its line number and the run goes on.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

use jetinfer_nats::subjects;
use jetinfer_schemas::{Job, JobOptions};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::{job_id, CustomIdHasher};

/// Longest `custom_id`: the job id `<run>:<custom_id>` must fit in 128
/// characters with a run id of up to 26.
pub const MAX_CUSTOM_ID_LEN: usize = 100;
/// Longest input line accepted; a job is at most 1 MiB on the wire by default.
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;
const FIELDS: &str = "custom_id, text, texts, model, options";

/// One non-blank input line, read and checked.
pub enum Line {
    /// A job to submit, unless a result for it exists already.
    Job {
        line: u64,
        custom_id: String,
        key: u64,
        job: Job,
    },
    /// A line refused before submission.
    Refused {
        line: u64,
        custom_id: Option<String>,
        message: String,
    },
}

/// Non-blank lines of `path` (the progress total). A streaming count.
pub fn count_lines(path: &Path) -> std::io::Result<u64> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut buf = Vec::new();
    let mut count = 0;
    loop {
        buf.clear();
        if read_bounded(&mut reader, &mut buf)? == Read::Eof {
            return Ok(count);
        }
        count += u64::from(!buf.trim_ascii().is_empty());
    }
}

#[derive(PartialEq)]
pub(crate) enum Read {
    Line,
    TooLong,
    Eof,
}

/// Reads one line into `buf` (without its newline), keeping at most
/// [`MAX_LINE_BYTES`] and skipping the rest of a longer line.
pub(crate) fn read_bounded(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Read> {
    let mut too_long = false;
    let mut any = false;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Read::Eof,
                (true, true) => Read::TooLong,
                (true, false) => Read::Line,
            });
        }
        any = true;
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if buf.len() + chunk.len() > MAX_LINE_BYTES {
            too_long = true;
        } else if !too_long {
            buf.extend_from_slice(chunk);
        }
        let used = found.unwrap_or(available.len());
        reader.consume(used);
        if found.is_some() {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(if too_long { Read::TooLong } else { Read::Line });
        }
    }
}

/// Reads `path` on a blocking thread and sends each non-blank line, checked,
/// to `lines`. Returns when the file ends or the receiver is dropped.
pub fn read(
    path: std::path::PathBuf,
    run: String,
    default_model: String,
    hasher: CustomIdHasher,
    lines: mpsc::Sender<Line>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    read_with(path, hasher, lines, move |bytes| {
        parse(bytes, &run, &default_model)
    })
}

/// What a line parser makes of one non-blank line: its `custom_id` and
/// job, or why it is refused (with the `custom_id` when one could be read).
pub type Parsed = Result<(String, Job), (Option<String>, String)>;

/// [`read`] with the line format given by `parse` (the Batch API's lines
/// differ from `jetinfer bulk`'s): bounded lines, line numbers, and
/// duplicate `custom_id`s refused, whatever the format.
pub fn read_with(
    path: std::path::PathBuf,
    hasher: CustomIdHasher,
    lines: mpsc::Sender<Line>,
    parse: impl Fn(&[u8]) -> Parsed + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::task::spawn_blocking(move || {
        let mut reader = std::io::BufReader::new(std::fs::File::open(&path)?);
        let mut buf = Vec::new();
        let mut seen = HashSet::new();
        let mut number = 0u64;
        loop {
            buf.clear();
            let read = read_bounded(&mut reader, &mut buf)?;
            if read == Read::Eof {
                return Ok(());
            }
            number += 1;
            let line = if read == Read::TooLong {
                Line::Refused {
                    line: number,
                    custom_id: None,
                    message: format!(
                        "line {number}: longer than {MAX_LINE_BYTES} bytes; split its texts over several lines"
                    ),
                }
            } else if buf.trim_ascii().is_empty() {
                continue;
            } else {
                match parse(&buf) {
                    Ok((custom_id, job)) => {
                        let key = hasher.key(&custom_id);
                        if seen.insert(key) {
                            Line::Job {
                                line: number,
                                custom_id,
                                key,
                                job,
                            }
                        } else {
                            Line::Refused {
                                line: number,
                                message: format!(
                                    "line {number}: duplicate custom_id {custom_id:?}: an earlier line has it; custom_ids must be unique"
                                ),
                                custom_id: Some(custom_id),
                            }
                        }
                    }
                    Err((custom_id, why)) => Line::Refused {
                        line: number,
                        custom_id,
                        message: format!("line {number}: {why}"),
                    },
                }
            };
            if lines.blocking_send(line).is_err() {
                return Ok(());
            }
        }
    })
}

/// Parses one line into its `custom_id` and job, or says what is wrong (with
/// the `custom_id` when it could be read).
fn parse(bytes: &[u8], run: &str, default_model: &str) -> Parsed {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| (None, format!("not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err((None, format!("expected a JSON object with {FIELDS}")));
    };
    let custom_id = custom_id(&fields).map_err(|why| (None, why))?;
    let job = job(&fields, run, &custom_id, default_model)
        .map_err(|why| (Some(custom_id.clone()), why))?;
    Ok((custom_id, job))
}

pub(crate) fn custom_id(fields: &Map<String, Value>) -> Result<String, String> {
    let id = match fields.get("custom_id") {
        None => return Err("missing \"custom_id\"".into()),
        Some(Value::String(id)) => id,
        Some(other) => return Err(format!("\"custom_id\" must be a string, not {other}")),
    };
    if id.is_empty() || id.len() > MAX_CUSTOM_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "\"custom_id\" {id:?} must be 1 to {MAX_CUSTOM_ID_LEN} printable ASCII characters without spaces"
        ));
    }
    Ok(id.clone())
}

fn job(
    fields: &Map<String, Value>,
    run: &str,
    custom_id: &str,
    default_model: &str,
) -> Result<Job, String> {
    if let Some(unknown) = fields
        .keys()
        .find(|k| !FIELDS.split(", ").any(|f| f == k.as_str()))
    {
        return Err(format!("unknown field {unknown:?} (expected {FIELDS})"));
    }
    let inputs = match (fields.get("text"), fields.get("texts")) {
        (Some(_), Some(_)) => return Err("give \"text\" or \"texts\", not both".into()),
        (None, None) => {
            return Err("missing \"text\" (a string) or \"texts\" (a list of strings)".into())
        }
        (Some(Value::String(text)), None) => vec![text.clone()],
        (Some(other), None) => {
            return Err(format!("\"text\" must be a string, not {}", kind(other)))
        }
        (None, Some(Value::Array(texts))) => {
            if texts.is_empty() {
                return Err("\"texts\" is empty: give at least one text".into());
            }
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| match t {
                    Value::String(t) => Ok(t.clone()),
                    other => Err(format!(
                        "\"texts\"[{i}] must be a string, not {}",
                        kind(other)
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        (None, Some(other)) => {
            return Err(format!(
                "\"texts\" must be a list of strings, not {}",
                kind(other)
            ))
        }
    };
    let model = match fields.get("model") {
        None => default_model.to_string(),
        Some(Value::String(model)) => model.clone(),
        Some(other) => return Err(format!("\"model\" must be a string, not {}", kind(other))),
    };
    subjects::check_token("model", &model).map_err(|e| e.to_string())?;
    let options = match fields.get("options") {
        None => JobOptions::default(),
        Some(options @ Value::Object(_)) => serde_json::from_value(options.clone()).map_err(|e| {
            format!("\"options\": {e} (fields: normalize true/false, truncation \"truncate\"/\"reject\")")
        })?,
        Some(other) => return Err(format!("\"options\" must be an object, not {}", kind(other))),
    };
    Ok(Job::new(model, inputs)
        .with_id(job_id(run, custom_id))
        .with_options(options))
}

pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(line: &str) -> String {
        parse(line.as_bytes(), "r1", "minilm").unwrap_err().1
    }

    #[test]
    fn a_good_line_becomes_a_job_named_after_run_and_custom_id() {
        let (id, job) = parse(
            br#"{"custom_id":"doc-1","texts":["a","b"],"options":{"normalize":false}}"#,
            "r1",
            "minilm",
        )
        .unwrap();
        assert_eq!(id, "doc-1");
        assert_eq!(job.id, "r1:doc-1");
        assert_eq!(job.model, "minilm");
        assert_eq!(job.inputs, ["a", "b"]);
        assert!(!job.options.normalize);
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(refused("{nope").contains("not valid JSON"));
        assert!(refused(r#"["a"]"#).contains("JSON object"));
        assert!(refused(r#"{"text":"a"}"#).contains("missing \"custom_id\""));
        assert!(refused(r#"{"custom_id":"has space","text":"a"}"#).contains("printable ASCII"));
        assert!(refused(r#"{"custom_id":"a"}"#).contains("missing \"text\""));
        assert!(refused(r#"{"custom_id":"a","texts":[]}"#).contains("empty"));
        assert!(refused(r#"{"custom_id":"a","text":1}"#).contains("must be a string"));
        assert!(refused(r#"{"custom_id":"a","text":"x","model":"a.b"}"#).contains("model"));
        assert!(refused(r#"{"custom_id":"a","text":"x","colour":1}"#).contains("unknown field"));
        assert!(
            refused(r#"{"custom_id":"a","text":"x","options":{"truncation":"cut"}}"#)
                .contains("options")
        );
    }

    #[test]
    fn over_long_lines_are_cut_and_reading_goes_on() {
        let mut data = vec![b'x'; MAX_LINE_BYTES + 10];
        data.extend_from_slice(b"\nnext\r\n");
        let mut reader = std::io::BufReader::new(&data[..]);
        let mut buf = Vec::new();
        assert!(read_bounded(&mut reader, &mut buf).unwrap() == Read::TooLong);
        buf.clear();
        assert!(read_bounded(&mut reader, &mut buf).unwrap() == Read::Line);
        assert_eq!(buf, b"next");
        buf.clear();
        assert!(read_bounded(&mut reader, &mut buf).unwrap() == Read::Eof);
    }
}
