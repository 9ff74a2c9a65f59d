//! Dynamic batching across jobs. The batcher is an actor: it owns the queue of
//! waiting inputs, takes jobs from the intake stage over a channel, and hands
//! batches to the inference thread whenever that thread can take one.
//!
//! Policy ([`take_batch`]): the oldest waiting input always goes into the next
//! batch (nothing starves). The rest of the batch is shared fairly between
//! the tenants with inputs waiting: the tenant served least so far in this
//! batch, counted in tokens, adds its next input, so a tenant with one small
//! job waiting is in the next batch however much another tenant has queued,
//! and tenants that all have backlogs get equal token shares of every batch.
//! Within a tenant, inputs closest in length to the oldest go first, so
//! padding stays small. The batch stays within `max_inputs` and `max_tokens`,
//! counted as the model pays ([`Cost`]: longest input x inputs when it pads,
//! the sum of the inputs when it packs).
//!
//! When a batch leaves ([`run`]): only when inference asks for one
//! ([`Batches::blocking_next`]), so no batch is formed ahead of the model:
//! while it runs, the inputs arriving meanwhile wait here and make the next
//! batch bigger (continuous batching, as text-embeddings-inference does).
//! When the model asks and inputs wait, they leave at once, after taking in
//! every job already handed over by intake; `max_wait` (0 by default) can
//! make an idle model wait that long for company, which no measurement so
//! far has shown to buy throughput (ARCHITECTURE.md, "Batching").

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::BatchConfig;
use crate::job::InFlightJob;

/// How many of each tenant's oldest inputs, in batches' worth
/// (`max_inputs`), are candidates for the next batch. It bounds the work of
/// forming a batch however long the queue is; length grouping only needs
/// the near future.
const LOOKAHEAD_BATCHES: usize = 8;

/// A job whose inputs can be batched.
pub trait BatchJob: Send + Sync + 'static {
    /// Token count of each input, in order.
    fn input_lens(&self) -> Vec<usize>;
    /// Whose job it is: batches are shared fairly between tenants.
    fn tenant(&self) -> &str;
}

impl BatchJob for InFlightJob {
    fn input_lens(&self) -> Vec<usize> {
        self.tokens.iter().map(|t| t.ids.len()).collect()
    }

    fn tenant(&self) -> &str {
        &self.tenant
    }
}

/// One input of one job, waiting for a batch.
pub struct Waiting<J> {
    pub job: Arc<J>,
    pub input: usize,
    pub len: usize,
    pub arrived: Instant,
    /// Arrival order across every tenant.
    seq: u64,
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

/// The inputs waiting for a batch: one lane per tenant with inputs waiting,
/// each oldest first. A lane goes when its last input does, so there are
/// never more lanes than waiting jobs.
pub struct Queue<J> {
    lanes: Vec<Lane<J>>,
    len: usize,
    next_seq: u64,
}

struct Lane<J> {
    tenant: String,
    items: VecDeque<Waiting<J>>,
}

impl<J: BatchJob> Default for Queue<J> {
    fn default() -> Self {
        Self {
            lanes: Vec::new(),
            len: 0,
            next_seq: 0,
        }
    }
}

impl<J: BatchJob> Queue<J> {
    /// Queues every input of `job`, at the back of its tenant's lane.
    pub fn push(&mut self, job: &Arc<J>, arrived: Instant) {
        let lens = job.input_lens();
        if lens.is_empty() {
            return;
        }
        let lane = match self.lanes.iter().position(|l| l.tenant == job.tenant()) {
            Some(lane) => lane,
            None => {
                self.lanes.push(Lane {
                    tenant: job.tenant().to_string(),
                    items: VecDeque::new(),
                });
                self.lanes.len() - 1
            }
        };
        self.len += lens.len();
        for (input, len) in lens.into_iter().enumerate() {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.lanes[lane].items.push_back(Waiting {
                job: Arc::clone(job),
                input,
                len,
                arrived,
                seq,
            });
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lane holding the oldest waiting input.
    fn oldest_lane(&self) -> Option<usize> {
        (0..self.lanes.len())
            .filter_map(|l| Some((self.lanes[l].items.front()?.seq, l)))
            .min()
            .map(|(_, l)| l)
    }

    /// When the oldest waiting input arrived.
    pub fn oldest_arrival(&self) -> Option<Instant> {
        self.oldest_lane()
            .and_then(|l| self.lanes[l].items.front())
            .map(|w| w.arrived)
    }

    /// Whether a full batch's worth of inputs waits.
    fn full(&self, limits: &BatchConfig, cost: Cost) -> bool {
        // Under max_inputs the queue is small, so counting it all is cheap.
        self.len >= limits.max_inputs
            || cost.of_items(
                self.lanes
                    .iter()
                    .flat_map(|l| l.items.iter().map(|w| w.len)),
            ) >= limits.max_tokens
    }
}

/// One tenant's part in forming a batch.
struct Share {
    lane: usize,
    /// Candidate positions in the lane, in the order they are offered.
    order: Vec<usize>,
    next: usize,
    /// Tokens of this tenant already in the batch.
    served: usize,
    taken: Vec<usize>,
}

/// Takes the next batch from `queue`: its oldest input, then, turn by turn,
/// the next input of the tenant with the fewest tokens in the batch so far,
/// while the batch stays within `max_inputs` and `max_tokens`.
pub fn take_batch<J: BatchJob>(
    queue: &mut Queue<J>,
    limits: &BatchConfig,
    cost: Cost,
) -> Vec<Waiting<J>> {
    let Some(anchor_lane) = queue.oldest_lane() else {
        return Vec::new();
    };
    let Some(anchor) = queue.lanes[anchor_lane].items.pop_front() else {
        return Vec::new();
    };
    let anchor_len = anchor.len;
    let window = limits.max_inputs.saturating_mul(LOOKAHEAD_BATCHES).max(1);

    // Each tenant's candidates: closest in length to the anchor, then oldest.
    let mut shares: Vec<Share> = queue
        .lanes
        .iter()
        .enumerate()
        .map(|(lane, l)| {
            let mut order: Vec<usize> = (0..l.items.len().min(window)).collect();
            order.sort_by_key(|&p| (l.items[p].len.abs_diff(anchor_len), l.items[p].seq));
            Share {
                lane,
                order,
                next: 0,
                served: if lane == anchor_lane { anchor_len } else { 0 },
                taken: Vec::new(),
            }
        })
        .collect();
    // Least served first; among equals, the one whose next candidate is oldest.
    let key = |share: &Share, index: usize, lanes: &[Lane<J>]| {
        let seq = lanes[share.lane].items[share.order[share.next]].seq;
        Reverse((share.served, seq, index))
    };
    let mut turns: BinaryHeap<_> = shares
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.order.is_empty())
        .map(|(i, s)| key(s, i, &queue.lanes))
        .collect();

    let mut count = 1;
    let mut longest = anchor_len;
    let mut total = anchor_len;
    while count < limits.max_inputs {
        let Some(Reverse((_, _, index))) = turns.pop() else {
            break;
        };
        let share = &mut shares[index];
        let position = share.order[share.next];
        share.next += 1;
        let len = queue.lanes[share.lane].items[position].len;
        let candidate_longest = longest.max(len);
        // A candidate over the budget is passed over; a shorter one of the
        // same tenant may still fit on its next turn.
        if cost.of(candidate_longest, count + 1, total + len) <= limits.max_tokens {
            longest = candidate_longest;
            total += len;
            count += 1;
            share.served += len;
            share.taken.push(position);
        }
        if share.next < share.order.len() {
            turns.push(key(share, index, &queue.lanes));
        }
    }

    let mut batch = Vec::with_capacity(count);
    batch.push(anchor);
    for share in &mut shares {
        if share.taken.is_empty() {
            continue;
        }
        share.taken.sort_unstable();
        let items = &mut queue.lanes[share.lane].items;
        // Taken positions lie within the lane's first `window` inputs:
        // rebuild only that front part, keeping the rest in order.
        let front_len = share.taken.last().map_or(0, |&p| p + 1);
        let mut taken = share.taken.iter().peekable();
        let mut kept = Vec::with_capacity(front_len - share.taken.len());
        for (position, item) in items.drain(..front_len).enumerate() {
            if taken.peek() == Some(&&position) {
                taken.next();
                batch.push(item);
            } else {
                kept.push(item);
            }
        }
        for item in kept.into_iter().rev() {
            items.push_front(item);
        }
    }
    queue.len -= batch.len();
    queue.lanes.retain(|l| !l.items.is_empty());
    batch.sort_by_key(|w| w.len);
    batch
}

/// The inference stage's end of the batcher: it asks for a batch each time
/// it can run one, and the batcher forms that batch then, from what waits.
pub struct Batches<J> {
    requests: mpsc::Sender<oneshot::Sender<Batch<J>>>,
}

/// The batcher's end: requests for a batch from the inference stage.
pub struct Requests<J> {
    requests: mpsc::Receiver<oneshot::Sender<Batch<J>>>,
}

/// The two ends of the batcher's hand-over to inference.
pub fn hand_over<J>() -> (Requests<J>, Batches<J>) {
    // One request at a time: inference asks, waits for the batch, runs it.
    let (tx, rx) = mpsc::channel(1);
    (Requests { requests: rx }, Batches { requests: tx })
}

impl<J> Batches<J> {
    /// The next batch, formed now from what waits (or, when nothing waits,
    /// as soon as something arrives). `None` once the batcher has ended:
    /// intake closed and every waiting input handed over.
    pub async fn next(&mut self) -> Option<Batch<J>> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).await.ok()?;
        rx.await.ok()
    }

    /// [`Batches::next`] for a thread outside the async runtime.
    pub fn blocking_next(&mut self) -> Option<Batch<J>> {
        let (tx, rx) = oneshot::channel();
        self.requests.blocking_send(tx).ok()?;
        rx.blocking_recv().ok()
    }
}

/// Runs the batcher until `jobs` closes, then flushes what is still waiting
/// (ignoring `max_wait`) and returns, which ends `batches`.
///
/// Jobs are taken from `jobs` as soon as they arrive, whether or not
/// inference is busy, so the channel holds no backlog in arrival order:
/// every admitted job waits here, in its tenant's lane, where batches are
/// shared fairly. A batch is formed only when inference asks for one: it
/// leaves at once if it is full, if intake has closed, or if its oldest
/// input has waited `max_wait`, once the jobs intake has already handed
/// over are in the queue (inputs that arrive together share a batch).
pub async fn run<J: BatchJob>(
    limits: BatchConfig,
    cost: Cost,
    mut jobs: mpsc::Receiver<Arc<J>>,
    mut requests: Requests<J>,
) {
    let mut waiting: Queue<J> = Queue::default();
    let mut open = true;
    // Inference's request for a batch, while it waits for one.
    let mut asked: Option<oneshot::Sender<Batch<J>>> = None;
    loop {
        // Everything intake has handed over joins the queue before a batch
        // forms: without this, the first job of a burst would leave alone.
        while open {
            match jobs.try_recv() {
                Ok(job) => waiting.push(&job, Instant::now()),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if !open && waiting.is_empty() {
            return;
        }
        let now = Instant::now();
        let oldest = waiting.oldest_arrival();
        let due = oldest.is_some_and(|t| now >= t + limits.max_wait);
        let ready = !waiting.is_empty() && (!open || due || waiting.full(&limits, cost));
        if ready {
            if let Some(reply) = asked.take() {
                if reply.is_closed() {
                    return; // inference has gone
                }
                let items = take_batch(&mut waiting, &limits, cost);
                if reply.send(Batch::new(items, cost, Instant::now())).is_err() {
                    return;
                }
                continue;
            }
        }
        let wake_at = oldest.map(|t| t + limits.max_wait).unwrap_or(now);

        tokio::select! {
            biased;
            request = requests.requests.recv(), if asked.is_none() => match request {
                Some(reply) => asked = Some(reply),
                None => return, // inference has gone
            },
            job = jobs.recv(), if open => match job {
                Some(job) => waiting.push(&job, Instant::now()),
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

    struct TestJob {
        tenant: &'static str,
        lens: Vec<usize>,
    }

    impl BatchJob for TestJob {
        fn input_lens(&self) -> Vec<usize> {
            self.lens.clone()
        }

        fn tenant(&self) -> &str {
            self.tenant
        }
    }

    fn job(tenant: &'static str, lens: &[usize]) -> Arc<TestJob> {
        Arc::new(TestJob {
            tenant,
            lens: lens.to_vec(),
        })
    }

    fn limits(max_inputs: usize, max_tokens: usize, max_wait_ms: u64) -> BatchConfig {
        BatchConfig {
            max_inputs,
            max_tokens,
            max_wait: Duration::from_millis(max_wait_ms),
        }
    }

    /// One tenant's job with inputs of `lens`, waiting.
    fn waiting(lens: &[usize]) -> Queue<TestJob> {
        queue(&[("t", lens)])
    }

    /// Jobs of `(tenant, input lengths)`, queued in this order.
    fn queue(jobs: &[(&'static str, &[usize])]) -> Queue<TestJob> {
        let mut queue = Queue::default();
        let now = Instant::now();
        for (tenant, lens) in jobs {
            queue.push(&job(tenant, lens), now);
        }
        queue
    }

    fn lens(batch: &[Waiting<TestJob>]) -> Vec<usize> {
        batch.iter().map(|w| w.len).collect()
    }

    /// Tokens of `tenant` in `batch`.
    fn tokens_of(batch: &[Waiting<TestJob>], tenant: &str) -> usize {
        batch
            .iter()
            .filter(|w| w.job.tenant == tenant)
            .map(|w| w.len)
            .sum()
    }

    /// What is left in `queue`, in arrival order.
    fn left(queue: &Queue<TestJob>) -> Vec<usize> {
        let mut items: Vec<&Waiting<TestJob>> =
            queue.lanes.iter().flat_map(|l| l.items.iter()).collect();
        items.sort_by_key(|w| w.seq);
        items.iter().map(|w| w.len).collect()
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
        assert!(queue.is_empty() && queue.lanes.is_empty());
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
        assert_eq!(left(&queue), vec![10]);
        assert_eq!(queue.len(), 1);
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
        assert_eq!(left(&queue), vec![3]);
    }

    #[test]
    fn another_tenants_input_joins_the_next_batch_however_much_one_tenant_has_queued() {
        // acme queued 40 jobs of 256 inputs before globex's one small job.
        let big = [10; 256];
        let mut jobs: Vec<(&'static str, &[usize])> = vec![("acme", &big); 40];
        jobs.push(("globex", &[12]));
        let mut queue = queue(&jobs);
        let batch = take_batch(&mut queue, &limits(32, 2048, 0), Cost::Packed);
        assert_eq!(batch.len(), 32);
        assert_eq!(tokens_of(&batch, "globex"), 12, "globex's input is in");
        // The oldest input of all (acme's first) is in too.
        assert!(batch.iter().any(|w| w.job.tenant == "acme" && w.seq == 0));
        assert_eq!(queue.len(), 40 * 256 + 1 - 32);
        assert_eq!(queue.lanes.len(), 1, "globex's empty lane is gone");
    }

    #[test]
    fn tenants_with_backlogs_share_each_batch_by_tokens_not_by_inputs() {
        // acme's inputs are twice as long as globex's; both have plenty queued.
        let mut queue = queue(&[("acme", &[20; 100]), ("globex", &[10; 100])]);
        let batch = take_batch(&mut queue, &limits(1000, 400, 0), Cost::Packed);
        let (acme, globex) = (tokens_of(&batch, "acme"), tokens_of(&batch, "globex"));
        assert_eq!(acme + globex, 400, "the budget is filled");
        assert!(
            acme.abs_diff(globex) <= 20,
            "within one input of equal shares: acme {acme}, globex {globex}"
        );
        // First in first out would have given acme all 400.
    }

    #[test]
    fn a_tenant_asking_less_than_its_share_gets_all_it_asks_and_the_rest_is_split() {
        let mut queue = queue(&[
            ("acme", &[10; 100]),
            ("globex", &[10; 100]),
            ("initech", &[10, 10]),
        ]);
        let batch = take_batch(&mut queue, &limits(1000, 200, 0), Cost::Packed);
        assert_eq!(tokens_of(&batch, "initech"), 20);
        assert_eq!(tokens_of(&batch, "acme"), 90);
        assert_eq!(tokens_of(&batch, "globex"), 90);
    }

    #[test]
    fn the_oldest_input_runs_first_even_when_its_tenant_is_the_heaviest() {
        // Under padding, acme's long oldest input anchors the batch and
        // globex's short ones fill it up to the budget.
        let mut queue = queue(&[("acme", &[50, 50, 50]), ("globex", &[5; 10])]);
        let batch = take_batch(&mut queue, &limits(100, 200, 0), Cost::Padded);
        assert_eq!(batch.iter().filter(|w| w.seq == 0).count(), 1);
        // 4 inputs padded to 50 fill the 200: the anchor and three of globex's.
        assert_eq!(lens(&batch), vec![5, 5, 5, 50]);
        // Every input eventually runs, in batches that each hold the oldest.
        let mut batches = 1;
        while !take_batch(&mut queue, &limits(100, 200, 0), Cost::Padded).is_empty() {
            batches += 1;
            assert!(batches < 20, "the queue drains");
        }
        assert!(queue.is_empty());
    }

    #[test]
    fn forming_a_batch_looks_only_at_each_tenants_oldest_inputs() {
        // The 5-token inputs closest to the anchor's length sit behind more
        // than LOOKAHEAD_BATCHES batches' worth of others: they wait their turn.
        let mut lengths = vec![5];
        lengths.extend(vec![100; 2 * LOOKAHEAD_BATCHES]);
        lengths.extend([5, 5]);
        let mut queue = waiting(&lengths);
        let batch = take_batch(&mut queue, &limits(2, 10_000, 0), Cost::Padded);
        assert_eq!(lens(&batch), vec![5, 100]);
    }

    /// Feeds `jobs` at their times, keeps intake open until `close_at`, and
    /// returns each batch's formation time and its inputs' `(tenant, len)`.
    /// Each batch takes inference `per_batch` to run.
    async fn collect_tenants(
        l: BatchConfig,
        jobs: Vec<(Duration, &'static str, Vec<usize>)>,
        close_at: Duration,
        per_batch: Duration,
    ) -> Vec<(Duration, Vec<(&'static str, usize)>)> {
        let (job_tx, job_rx) = mpsc::channel(64);
        let (requests, mut batches) = hand_over();
        let start = Instant::now();
        tokio::spawn(run(l, Cost::Padded, job_rx, requests));
        tokio::spawn(async move {
            // Jobs due at the same instant are handed over back to back, as
            // intake does with the messages of one pull.
            let mut last = None;
            for (at, tenant, lens) in jobs {
                if last != Some(at) {
                    tokio::time::sleep_until(start + at).await;
                    last = Some(at);
                }
                job_tx
                    .send(Arc::new(TestJob { tenant, lens }))
                    .await
                    .unwrap();
            }
            tokio::time::sleep_until(start + close_at).await;
        });
        let mut out = Vec::new();
        while let Some(batch) = batches.next().await {
            let items = batch.items.iter().map(|w| (w.job.tenant, w.len)).collect();
            out.push((batch.formed_at - start, items));
            tokio::time::sleep(per_batch).await;
        }
        out
    }

    async fn collect(
        l: BatchConfig,
        jobs: Vec<(Duration, Vec<usize>)>,
        close_at: Duration,
    ) -> Vec<(Duration, Vec<usize>)> {
        let jobs = jobs.into_iter().map(|(at, lens)| (at, "t", lens)).collect();
        collect_tenants(l, jobs, close_at, Duration::ZERO)
            .await
            .into_iter()
            .map(|(at, items)| (at, items.into_iter().map(|(_, len)| len).collect()))
            .collect()
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

    #[tokio::test(start_paused = true)]
    async fn an_idle_model_takes_a_lone_input_at_once_without_max_wait() {
        let out = collect(
            limits(8, 10_000, 0),
            vec![(Duration::ZERO, vec![7])],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(out, vec![(Duration::ZERO, vec![7])]);
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_handed_over_together_share_the_batch_an_idle_model_takes() {
        let out = collect(
            limits(8, 10_000, 0),
            vec![
                (Duration::ZERO, vec![5]),
                (Duration::ZERO, vec![6]),
                (Duration::ZERO, vec![7, 8]),
            ],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(out, vec![(Duration::ZERO, vec![5, 6, 7, 8])]);
    }

    #[tokio::test(start_paused = true)]
    async fn inputs_arriving_while_the_model_runs_wait_for_it_and_leave_together() {
        let ms = Duration::from_millis;
        // Each batch takes the model 10 ms; nothing is formed ahead of it.
        let jobs = [0, 2, 4, 6, 13]
            .into_iter()
            .map(|at| (ms(at), "t", vec![at as usize + 1]))
            .collect();
        let out =
            collect_tenants(limits(8, 10_000, 0), jobs, Duration::from_secs(10), ms(10)).await;
        let formed: Vec<_> = out
            .into_iter()
            .map(|(at, items)| (at, items.into_iter().map(|(_, len)| len).collect()))
            .collect::<Vec<(Duration, Vec<usize>)>>();
        assert_eq!(
            formed,
            vec![
                (ms(0), vec![1]),
                (ms(10), vec![3, 5, 7]),
                (ms(20), vec![14])
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_job_behind_a_flood_runs_in_the_next_batch_that_forms() {
        let ms = Duration::from_millis;
        // acme's 512 inputs are 16 batches of 32, 10 ms each; globex's one
        // input arrives 1 ms in.
        let out = collect_tenants(
            limits(32, 10_000, 5),
            vec![
                (ms(0), "acme", vec![10; 256]),
                (ms(0), "acme", vec![10; 256]),
                (ms(1), "globex", vec![10]),
            ],
            Duration::from_secs(10),
            ms(10),
        )
        .await;
        let globex_batch = out
            .iter()
            .position(|(_, items)| items.iter().any(|(t, _)| *t == "globex"))
            .expect("globex's input ran");
        let (formed, _) = out[globex_batch];
        // One batch formed before it arrived (the model asked at 0 ms); the
        // next, formed when the model asks again at 10 ms, holds it. In
        // arrival order it would have run last, after 160 ms.
        assert_eq!(globex_batch, 1, "{out:?}");
        assert_eq!(formed, ms(10));
        let inputs: usize = out.iter().map(|(_, items)| items.len()).sum();
        assert_eq!(inputs, 513, "every input ran once");
    }
}
