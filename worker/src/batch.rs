//! Dynamic batching across jobs. The batcher is an actor: it owns the queue of
//! waiting inputs, takes jobs from the intake stage over a channel, and hands
//! batches to the inference thread whenever that thread can take one.
//!
//! Policy ([`take_batch`]): the oldest waiting input always goes into the next
//! batch (nothing starves), and it is joined by the waiting inputs closest to
//! it in length, so padding stays small, while the batch stays within
//! `max_inputs` and `max_tokens`, counted as the model pays ([`Cost`]:
//! longest input x inputs when it pads, the sum of the inputs when it packs).
//! A batch leaves when it is full or when its oldest input has waited
//! `max_wait`, and only when inference is ready for it, so a busy model lets
//! batches grow instead of queueing small ones.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::BatchConfig;

/// A job whose inputs can be batched.
pub trait BatchJob: Send + Sync + 'static {
    /// Token count of each input, in order.
    fn input_lens(&self) -> Vec<usize>;
}

/// One input of one job, waiting for a batch.
pub struct Waiting<J> {
    pub job: Arc<J>,
    pub input: usize,
    pub len: usize,
    pub arrived: Instant,
}

/// How many token positions a batch occupies in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Every input padded to the longest: longest x inputs.
    Padded,
    /// Inputs packed end to end: the sum of their tokens.
    Packed,
}

impl Cost {
    fn of(self, longest: usize, count: usize, total: usize) -> usize {
        match self {
            Cost::Padded => longest * count,
            Cost::Packed => total,
        }
    }

    fn of_items(self, items: impl Iterator<Item = usize> + Clone) -> usize {
        let longest = items.clone().max().unwrap_or(0);
        self.of(longest, items.clone().count(), items.sum())
    }
}

/// Inputs from one or more jobs that run in one forward pass.
pub struct Batch<J> {
    pub items: Vec<Waiting<J>>,
    /// Token positions the model computes, padding included ([`Cost`]).
    pub padded_tokens: usize,
    pub formed_at: Instant,
}

impl<J> Batch<J> {
    fn new(items: Vec<Waiting<J>>, cost: Cost, formed_at: Instant) -> Self {
        Self {
            padded_tokens: cost.of_items(items.iter().map(|w| w.len)),
            items,
            formed_at,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Takes the next batch from `waiting` (oldest first in the deque).
pub fn take_batch<J>(
    waiting: &mut VecDeque<Waiting<J>>,
    limits: &BatchConfig,
    cost: Cost,
) -> Vec<Waiting<J>> {
    let Some(anchor) = waiting.front() else {
        return Vec::new();
    };
    let anchor_len = anchor.len;
    // Candidates by closeness in length to the anchor, then by age.
    let mut order: Vec<usize> = (1..waiting.len()).collect();
    order.sort_by_key(|&i| (waiting[i].len.abs_diff(anchor_len), i));

    let mut chosen = vec![0usize];
    let mut longest = anchor_len;
    let mut total = anchor_len;
    for i in order {
        if chosen.len() >= limits.max_inputs {
            break;
        }
        let candidate_longest = longest.max(waiting[i].len);
        let candidate_total = total + waiting[i].len;
        if cost.of(candidate_longest, chosen.len() + 1, candidate_total) > limits.max_tokens {
            // Candidates only get further from the anchor's length from here on,
            // but a shorter one may still fit: keep looking.
            continue;
        }
        longest = candidate_longest;
        total = candidate_total;
        chosen.push(i);
    }
    chosen.sort_unstable();
    let mut batch = Vec::with_capacity(chosen.len());
    for (removed, index) in chosen.into_iter().enumerate() {
        batch.push(waiting.remove(index - removed).expect("index in range"));
    }
    batch.sort_by_key(|w| w.len);
    batch
}

/// Whether `waiting` holds a full batch's worth of inputs.
fn full<J>(waiting: &VecDeque<Waiting<J>>, limits: &BatchConfig, cost: Cost) -> bool {
    waiting.len() >= limits.max_inputs
        || cost.of_items(waiting.iter().map(|w| w.len)) >= limits.max_tokens
}

/// Runs the batcher until `jobs` closes, then flushes what is still waiting
/// (ignoring `max_wait`) and returns, which closes `batches`.
pub async fn run<J: BatchJob>(
    limits: BatchConfig,
    cost: Cost,
    mut jobs: mpsc::Receiver<Arc<J>>,
    batches: mpsc::Sender<Batch<J>>,
) {
    let mut waiting: VecDeque<Waiting<J>> = VecDeque::new();
    let mut open = true;
    loop {
        if !open && waiting.is_empty() {
            return;
        }
        let now = Instant::now();
        let oldest = waiting.front().map(|w| w.arrived);
        let due = oldest.is_some_and(|t| now >= t + limits.max_wait);
        let ready = !waiting.is_empty() && (!open || due || full(&waiting, &limits, cost));
        let wake_at = oldest.map(|t| t + limits.max_wait).unwrap_or(now);

        tokio::select! {
            biased;
            permit = batches.reserve(), if ready => {
                let Ok(permit) = permit else { return }; // inference has gone
                let items = take_batch(&mut waiting, &limits, cost);
                permit.send(Batch::new(items, cost, Instant::now()));
            }
            job = jobs.recv(), if open => match job {
                Some(job) => {
                    let arrived = Instant::now();
                    for (input, len) in job.input_lens().into_iter().enumerate() {
                        waiting.push_back(Waiting { job: Arc::clone(&job), input, len, arrived });
                    }
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(wake_at), if !waiting.is_empty() && !ready => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct TestJob(Vec<usize>);

    impl BatchJob for TestJob {
        fn input_lens(&self) -> Vec<usize> {
            self.0.clone()
        }
    }

    fn limits(max_inputs: usize, max_tokens: usize, max_wait_ms: u64) -> BatchConfig {
        BatchConfig {
            max_inputs,
            max_tokens,
            max_wait: Duration::from_millis(max_wait_ms),
        }
    }

    fn waiting(lens: &[usize]) -> VecDeque<Waiting<TestJob>> {
        let job = Arc::new(TestJob(lens.to_vec()));
        let now = Instant::now();
        lens.iter()
            .enumerate()
            .map(|(input, &len)| Waiting {
                job: job.clone(),
                input,
                len,
                arrived: now,
            })
            .collect()
    }

    fn lens(batch: &[Waiting<TestJob>]) -> Vec<usize> {
        batch.iter().map(|w| w.len).collect()
    }

    #[test]
    fn batch_never_exceeds_max_inputs() {
        let mut queue = waiting(&[5; 10]);
        let l = limits(4, 10_000, 0);
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            let b = take_batch(&mut queue, &l, Cost::Padded);
            (!b.is_empty()).then_some(b.len())
        })
        .collect();
        assert_eq!(sizes, vec![4, 4, 2]);
    }

    #[test]
    fn batch_stays_within_padded_token_budget() {
        // The budget is longest x count: 3 inputs of 10 tokens cost 30.
        let mut queue = waiting(&[10, 10, 10, 10, 10]);
        let batch = take_batch(&mut queue, &limits(100, 30, 0), Cost::Padded);
        assert_eq!(lens(&batch), vec![10, 10, 10]);
        // One long input raises everyone's cost: 40 + 10 would pad to 80.
        let mut queue = waiting(&[40, 10, 10]);
        let batch = take_batch(&mut queue, &limits(100, 60, 0), Cost::Padded);
        assert_eq!(
            lens(&batch),
            vec![40],
            "the oldest goes alone rather than over budget"
        );
        assert_eq!(
            lens(&take_batch(&mut queue, &limits(100, 60, 0), Cost::Padded)),
            vec![10, 10]
        );
    }

    #[test]
    fn packed_budget_counts_real_tokens_so_a_long_input_does_not_crowd_out_short_ones() {
        // Packed, 40 + 10 + 10 costs 60, not 120: all three fit a budget of 60.
        let mut queue = waiting(&[40, 10, 10, 10]);
        let batch = take_batch(&mut queue, &limits(100, 60, 0), Cost::Packed);
        assert_eq!(lens(&batch), vec![10, 10, 40]);
        let left: Vec<usize> = queue.iter().map(|w| w.len).collect();
        assert_eq!(left, vec![10]);
    }

    #[test]
    fn oldest_input_always_runs_even_over_budget() {
        let mut queue = waiting(&[300, 5]);
        let batch = take_batch(&mut queue, &limits(8, 256, 0), Cost::Padded);
        assert_eq!(lens(&batch), vec![300]);
    }

    #[test]
    fn inputs_are_grouped_by_length_around_the_oldest() {
        let mut queue = waiting(&[20, 200, 3, 21, 190, 19, 4]);
        let batch = take_batch(&mut queue, &limits(3, 10_000, 0), Cost::Padded);
        assert_eq!(lens(&batch), vec![19, 20, 21]);
        let next = take_batch(&mut queue, &limits(3, 10_000, 0), Cost::Padded);
        // The oldest left is the 200: it anchors the next batch with its nearest lengths.
        assert_eq!(lens(&next), vec![4, 190, 200]);
    }

    /// Feeds `jobs` at their times, keeps intake open until `close_at`, and
    /// returns each batch's formation time and input lengths.
    async fn collect(
        l: BatchConfig,
        jobs: Vec<(Duration, Vec<usize>)>,
        close_at: Duration,
    ) -> Vec<(Duration, Vec<usize>)> {
        let (job_tx, job_rx) = mpsc::channel(64);
        let (batch_tx, mut batch_rx) = mpsc::channel(1);
        let start = Instant::now();
        tokio::spawn(run(l, Cost::Padded, job_rx, batch_tx));
        tokio::spawn(async move {
            for (at, lens) in jobs {
                tokio::time::sleep_until(start + at).await;
                job_tx.send(Arc::new(TestJob(lens))).await.unwrap();
            }
            tokio::time::sleep_until(start + close_at).await;
        });
        let mut out = Vec::new();
        while let Some(batch) = batch_rx.recv().await {
            out.push((batch.formed_at - start, lens(&batch.items)));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_input_leaves_after_max_wait_not_before() {
        let out = collect(
            limits(8, 10_000, 50),
            vec![(Duration::ZERO, vec![7])],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(out, vec![(Duration::from_millis(50), vec![7])]);
    }

    #[tokio::test(start_paused = true)]
    async fn inputs_arriving_within_max_wait_share_a_batch() {
        let ms = Duration::from_millis;
        let out = collect(
            limits(8, 10_000, 50),
            vec![(ms(0), vec![5]), (ms(20), vec![6, 7]), (ms(120), vec![8])],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(out, vec![(ms(50), vec![5, 6, 7]), (ms(170), vec![8])]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_leaves_without_waiting() {
        let ms = Duration::from_millis;
        let out = collect(
            limits(2, 10_000, 1_000),
            vec![(ms(0), vec![5, 5, 5])],
            Duration::from_secs(10),
        )
        .await;
        // The remainder is not full: it waits out max_wait.
        assert_eq!(out, vec![(ms(0), vec![5, 5]), (ms(1_000), vec![5])]);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_intake_flushes_what_waits_without_waiting_out_max_wait() {
        let ms = Duration::from_millis;
        let out = collect(limits(8, 10_000, 1_000), vec![(ms(0), vec![5, 6])], ms(100)).await;
        assert_eq!(out, vec![(ms(100), vec![5, 6])]);
    }
}
