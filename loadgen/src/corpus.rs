//! Texts to embed and the job mix drawn from them.
//!
//! A corpus is a JSON file (a list of strings, or of objects with a `text`
//! field) or a JSONL file (one string or `{"text": ...}` per line), such as
//! `../shared/data/bench_corpus.json`. Jobs are drawn from it by kind
//! (single, small, large...) according to the mix's weights, from a seeded
//! generator so a run can be repeated exactly.

use std::path::Path;

use jetinfer_schemas::Job;
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::scenario::JobKind;

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("reading corpus {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "corpus {path}, {where_}: expected a string or an object with a \"text\" string ({source})"
    )]
    Parse {
        path: String,
        where_: String,
        source: serde_json::Error,
    },
    #[error("corpus {0} holds no texts")]
    Empty(String),
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Entry {
    Text(String),
    Object { text: String },
}

impl Entry {
    fn into_text(self) -> String {
        match self {
            Entry::Text(t) | Entry::Object { text: t } => t,
        }
    }
}

/// Reads the texts of a JSON or JSONL file.
pub fn load(path: &Path) -> Result<Vec<String>, CorpusError> {
    let shown = path.display().to_string();
    let data = std::fs::read_to_string(path).map_err(|source| CorpusError::Read {
        path: shown.clone(),
        source,
    })?;
    let texts = parse(&data, &shown)?;
    if texts.is_empty() {
        return Err(CorpusError::Empty(shown));
    }
    Ok(texts)
}

/// Parses corpus text: a JSON array if it starts with `[`, JSONL otherwise.
pub fn parse(data: &str, path: &str) -> Result<Vec<String>, CorpusError> {
    if data.trim_start().starts_with('[') {
        let entries: Vec<Entry> =
            serde_json::from_str(data).map_err(|source| CorpusError::Parse {
                path: path.into(),
                where_: "top-level list".into(),
                source,
            })?;
        return Ok(entries.into_iter().map(Entry::into_text).collect());
    }
    data.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str::<Entry>(line)
                .map(Entry::into_text)
                .map_err(|source| CorpusError::Parse {
                    path: path.into(),
                    where_: format!("line {}", i + 1),
                    source,
                })
        })
        .collect()
}

/// Draws jobs from a corpus according to a mix.
pub struct JobSource {
    texts: Vec<String>,
    kinds: Vec<JobKind>,
    pick: WeightedIndex<u32>,
    rng: StdRng,
    model: String,
}

impl JobSource {
    /// `mix` must have at least one positive weight (see `Scenario::validate`).
    pub fn new(texts: Vec<String>, mix: &[JobKind], model: &str, seed: u64) -> Self {
        let pick = WeightedIndex::new(mix.iter().map(|k| k.weight))
            .expect("a validated mix has a positive weight");
        Self {
            texts,
            kinds: mix.to_vec(),
            pick,
            rng: StdRng::seed_from_u64(seed),
            model: model.into(),
        }
    }

    /// The next job and the name of its kind.
    pub fn next_job(&mut self) -> (Job, usize) {
        let kind_index = self.pick.sample(&mut self.rng);
        let kind = &self.kinds[kind_index];
        let n = self.rng.random_range(kind.min_inputs..=kind.max_inputs);
        let inputs = (0..n)
            .map(|_| self.texts[self.rng.random_range(0..self.texts.len())].clone())
            .collect();
        (Job::new(self.model.clone(), inputs), kind_index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::default_mix;

    #[test]
    fn json_lists_and_jsonl_lines_both_load() {
        assert_eq!(parse(r#"["a", {"text": "b"}]"#, "x").unwrap(), ["a", "b"]);
        assert_eq!(
            parse("\"a\"\n\n{\"text\": \"b\", \"id\": 3}\n", "x").unwrap(),
            ["a", "b"]
        );
        let err = parse("\"a\"\n42\n", "x").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn jobs_follow_the_mix_and_the_seed() {
        let texts: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        let mix = default_mix();
        let mut a = JobSource::new(texts.clone(), &mix, "minilm", 7);
        let mut b = JobSource::new(texts, &mix, "minilm", 7);
        let mut counts = [0usize; 3];
        for _ in 0..2000 {
            let (ja, ka) = a.next_job();
            let (jb, kb) = b.next_job();
            assert_eq!((ja.inputs.clone(), ka), (jb.inputs, kb));
            let k = &mix[ka];
            assert!((k.min_inputs..=k.max_inputs).contains(&ja.inputs.len()));
            counts[ka] += 1;
        }
        // 70/25/5 weights: single clearly dominates, large is rare but present.
        assert!(counts[0] > counts[1] && counts[1] > counts[2] && counts[2] > 0);
    }
}
