//! The output and error files. On start they are read once (streamed) to
//! learn which `custom_id`s are done, a partial last line left by a crash is
//! cut off, and both are then appended to. Output lines are results
//! (embeddings); error lines are either a job's typed error reply (with its
//! `job_id`) or a refused input line (with its `line` number).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use jetinfer_schemas::{Embeddings, JobError};
use serde::{Deserialize, Serialize};

use super::{BulkError, CustomIdHasher};

/// What earlier invocations of the run left in the files.
#[derive(Default)]
pub struct Resumed {
    /// Keys of `custom_id`s with a result (output) or an error reply (errors).
    pub done: HashSet<u64>,
    /// Line numbers already written to the error file as refused.
    pub refused_lines: HashSet<u64>,
    pub ok: u64,
    pub failed: u64,
}

pub struct Files {
    output: BufWriter<File>,
    errors: BufWriter<File>,
    output_path: PathBuf,
    errors_path: PathBuf,
}

#[derive(Deserialize)]
struct Head {
    custom_id: Option<String>,
    job_id: Option<String>,
    line: Option<u64>,
}

#[derive(Serialize)]
struct OkLine<'a> {
    custom_id: &'a str,
    job_id: &'a str,
    model: &'a str,
    embeddings: &'a [Vec<f32>],
    token_counts: &'a [u32],
    truncated: &'a [bool],
}

#[derive(Serialize)]
struct FailedLine<'a> {
    custom_id: &'a str,
    job_id: &'a str,
    error: &'a JobError,
}

#[derive(Serialize)]
struct RefusedLine<'a> {
    line: u64,
    custom_id: Option<&'a str>,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

/// Opens (creating or resuming) the output and error files.
pub fn open(
    output: &Path,
    errors: &Path,
    hasher: &CustomIdHasher,
) -> Result<(Files, Resumed), BulkError> {
    let mut resumed = Resumed::default();
    let output_file = open_resumable(output, |head| {
        if let Some(id) = head.custom_id {
            resumed.done.insert(hasher.key(&id));
            resumed.ok += 1;
        }
    })?;
    let errors_file = open_resumable(errors, |head| {
        match (head.custom_id, head.job_id, head.line) {
            (Some(id), Some(_), _) => {
                resumed.done.insert(hasher.key(&id));
                resumed.failed += 1;
            }
            (_, None, Some(line)) => {
                resumed.refused_lines.insert(line);
            }
            _ => {}
        }
    })?;
    Ok((
        Files {
            output: BufWriter::new(output_file),
            errors: BufWriter::new(errors_file),
            output_path: output.to_path_buf(),
            errors_path: errors.to_path_buf(),
        },
        resumed,
    ))
}

/// Reads each complete line of `path` into `seen`, cuts a partial last line
/// off, and returns the file positioned for appending.
fn open_resumable(path: &Path, mut seen: impl FnMut(Head)) -> Result<File, BulkError> {
    let io = |source| BulkError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    let mut complete = 0u64;
    let mut reader = BufReader::new(&file);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        complete += n as u64;
        if let Ok(head) = serde_json::from_slice::<Head>(&line) {
            seen(head);
        }
    }
    drop(reader);
    file.set_len(complete).map_err(io)?;
    file.seek(std::io::SeekFrom::End(0)).map_err(io)?;
    Ok(file)
}

impl Files {
    pub fn write_ok(
        &mut self,
        custom_id: &str,
        job_id: &str,
        e: &Embeddings,
    ) -> Result<(), BulkError> {
        let line = OkLine {
            custom_id,
            job_id,
            model: &e.model.id,
            embeddings: &e.embeddings,
            token_counts: &e.token_counts,
            truncated: &e.truncated,
        };
        write_line(&mut self.output, &self.output_path, &line)
    }

    pub fn write_failed(
        &mut self,
        custom_id: &str,
        job_id: &str,
        error: &JobError,
    ) -> Result<(), BulkError> {
        let line = FailedLine {
            custom_id,
            job_id,
            error,
        };
        write_line(&mut self.errors, &self.errors_path, &line)
    }

    pub fn write_refused(
        &mut self,
        line: u64,
        custom_id: Option<&str>,
        code: &str,
        message: &str,
    ) -> Result<(), BulkError> {
        let line = RefusedLine {
            line,
            custom_id,
            error: ErrorBody { code, message },
        };
        write_line(&mut self.errors, &self.errors_path, &line)
    }

    pub fn flush(&mut self) -> Result<(), BulkError> {
        self.output.flush().map_err(|source| BulkError::Io {
            path: self.output_path.clone(),
            source,
        })?;
        self.errors.flush().map_err(|source| BulkError::Io {
            path: self.errors_path.clone(),
            source,
        })
    }
}

fn write_line(
    out: &mut BufWriter<File>,
    path: &Path,
    line: &impl Serialize,
) -> Result<(), BulkError> {
    let io = |source| BulkError::Io {
        path: path.to_path_buf(),
        source,
    };
    serde_json::to_writer(&mut *out, line).map_err(|e| io(e.into()))?;
    out.write_all(b"\n").map_err(io)
}
