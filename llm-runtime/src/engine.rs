//! The serving engine: continuous batching of many sequences over the paged KV cache.
//!
//! An application creates an [`Engine`] over a compiled [`Model`], adds requests (prompt
//! token ids and sampling parameters), and calls [`Engine::step`] until it has no work; each
//! step reports the tokens it produced. A step first spends its prompt-token budget:
//! on the prompt an earlier step left half prefilled, then on admitting waiting requests
//! while the KV pool has their blocks, prefilling each (reusing the KV of cached prompt
//! prefixes) in chunks of what the budget has left, so that no step runs more than the
//! budget of prompt tokens however long a prompt is; then it runs one decode call for
//! every running sequence, one token each. When the pool runs out during decode, the most
//! recently admitted sequence is preempted: its blocks are freed and it is recomputed
//! later from its tokens. A running request can [fork](Engine::fork) (parallel sampling):
//! the new request shares every block of the old one, and whichever first writes to their
//! shared last block writes to a copy of it (copy-on-write).
//!
//! Every sequence follows llama2.c's `run.c` loop: `steps` counts positions including the
//! prompt, and producing BOS ends the sequence. Rows of a batch never interact, so each
//! sequence's tokens are those it would produce alone.

use std::{collections::VecDeque, time::Instant};

use llm_ir::interp::KvCache;

use crate::{
    block_manager::{BlockManager, SeqId},
    generate::{Batch, Model, RunError, Step},
    model::BLOCK_SIZE,
    sampler::{Sampler, SamplerConfig},
    tokenizer::BOS,
};

/// Engine limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Blocks in the KV pool (of [`BLOCK_SIZE`] positions).
    pub num_blocks: usize,
    /// Most prompt tokens prefilled in one step (at least one): a longer prompt is
    /// prefilled in chunks over several steps, while the running sequences decode.
    pub max_step_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            num_blocks: 1024,
            max_step_tokens: 2048,
            max_running: 64,
        }
    }
}

/// How one request generates.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestParams {
    /// Positions to run, prompt included (run.c's `-n`).
    pub steps: usize,
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Tokens that end the sequence when sampled (BOS alone is run.c's behaviour; see
    /// [`TextCodec::stop_tokens`](crate::tokenizer::TextCodec::stop_tokens)).
    pub stop_tokens: Vec<u32>,
}

/// Something a step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Request `id` produced `token` (its previous token is `prev`, for decoding text).
    Token {
        /// The request.
        id: SeqId,
        /// The token before it.
        prev: u32,
        /// The new token.
        token: u32,
    },
    /// Request `id` finished.
    Finished {
        /// The request.
        id: SeqId,
    },
}

struct Request {
    id: SeqId,
    /// The prompt and every token produced so far.
    tokens: Vec<u32>,
    params: RequestParams,
    sampler: Sampler,
    /// Positions whose keys and values are in the cache.
    computed: usize,
    /// A produced token not yet run through the model.
    pending: Option<u32>,
    admitted: u64,
    /// Time of each produced token (for latency statistics).
    token_times: Vec<Instant>,
    /// Completions of the same prompt ([`Engine::add_request_n`]) that start as copies of
    /// this request once its prompt is prefilled: their ids and samplers.
    siblings: Vec<(SeqId, SamplerConfig)>,
    /// Cancelled while prefilling for its siblings: it finishes its prefill for them and
    /// then ends without producing a token.
    cancelled: bool,
}

impl Request {
    /// A request of `prompt`, not yet admitted.
    fn new(id: SeqId, prompt: Vec<u32>, params: RequestParams) -> Request {
        Request {
            id,
            tokens: prompt,
            sampler: Sampler::new(params.sampler.clone()),
            params,
            computed: 0,
            pending: None,
            admitted: 0,
            token_times: Vec::new(),
            siblings: Vec::new(),
            cancelled: false,
        }
    }

    /// Request `id` going on from where this one is (its tokens, its positions in the
    /// cache, its pending token), sampling with `sampler`, admitted `admitted`-th; the
    /// caller shares the blocks ([`BlockManager::fork`]).
    fn child(&self, id: SeqId, sampler: SamplerConfig, admitted: u64) -> Request {
        Request {
            computed: self.computed,
            pending: self.pending,
            admitted,
            ..Request::new(
                id,
                self.tokens.clone(),
                RequestParams {
                    sampler,
                    ..self.params.clone()
                },
            )
        }
    }

    /// The prompt positions the request prefills (a prompt longer than `steps` is cut).
    fn prompt_positions(&self) -> usize {
        self.tokens.len().min(self.params.steps.max(1))
    }

    /// Requests that run once this one's prompt is prefilled: it and its siblings.
    fn group(&self) -> usize {
        1 + self.siblings.len()
    }
}

/// Counters of an engine's life.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    /// Steps run.
    pub steps: usize,
    /// Sequences preempted for lack of blocks.
    pub preemptions: usize,
    /// Prompt positions whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Prompt positions prefilled.
    pub prefilled_tokens: usize,
    /// `@prefill` calls (a prompt longer than a step's budget takes several).
    pub prefill_calls: usize,
    /// Most blocks in use at once.
    pub peak_blocks: usize,
    /// Positions held when the most blocks were in use.
    pub tokens_at_peak: usize,
    /// Blocks copied before a write because another sequence shared them (after a fork).
    pub block_copies: usize,
}

/// The serving engine.
pub struct Engine<'m> {
    model: &'m Model,
    config: EngineConfig,
    blocks: BlockManager,
    cache: Option<KvCache>,
    waiting: VecDeque<Request>,
    /// The admitted request whose prompt is partly prefilled (at most one).
    prefilling: Option<Request>,
    running: Vec<Request>,
    next_id: SeqId,
    admissions: u64,
    stats: EngineStats,
    /// First-token and per-token times of finished requests, by id.
    finished_times: Vec<(SeqId, Vec<Instant>)>,
}

impl<'m> Engine<'m> {
    /// An engine over `model` with a KV pool of `config.num_blocks` blocks, or of the
    /// blocks `plan-kv-memory` planned for the model (which then replace the config's).
    pub fn new(model: &'m Model, mut config: EngineConfig) -> Engine<'m> {
        config.num_blocks = model.cache_blocks(config.num_blocks);
        let cache = model.new_cache(config.num_blocks);
        Engine {
            model,
            blocks: BlockManager::new(config.num_blocks, BLOCK_SIZE),
            config,
            cache: Some(cache),
            waiting: VecDeque::new(),
            prefilling: None,
            running: Vec::new(),
            next_id: 0,
            admissions: 0,
            stats: EngineStats::default(),
            finished_times: Vec::new(),
        }
    }

    /// Queues a request; returns its id.
    pub fn add_request(&mut self, prompt: Vec<u32>, params: RequestParams) -> SeqId {
        self.queue(prompt, params, 1)[0]
    }

    /// Queues `n` (at least one) completions of one prompt: parallel sampling. The prompt
    /// is prefilled once; then each completion samples its first token from the prompt's
    /// last logits, completion `k` with `params.sampler` seeded `seed + k`, and they go on
    /// as separate requests sharing the prompt's blocks (the last one, partly filled,
    /// copied for each completion that writes it). Returns their ids, consecutive.
    ///
    /// # Errors
    ///
    /// When `n` exceeds [`EngineConfig::max_running`]: the completions run together.
    pub fn add_request_n(
        &mut self,
        prompt: Vec<u32>,
        params: RequestParams,
        n: usize,
    ) -> Result<Vec<SeqId>, RunError> {
        if n > self.config.max_running {
            return Err(format!(
                "{n} completions of a prompt run together, but the engine runs at most {} requests at once",
                self.config.max_running
            ));
        }
        Ok(self.queue(prompt, params, n))
    }

    /// Queues `n` completions of `prompt` ([`Engine::add_request_n`]). A model whose
    /// positions are learned
    /// ([`ModelConfig::learned_positions`](crate::model::ModelConfig::learned_positions))
    /// has none past its table: its requests run at most that many positions.
    fn queue(&mut self, prompt: Vec<u32>, mut params: RequestParams, n: usize) -> Vec<SeqId> {
        let config = self.model.config();
        if config.learned_positions {
            params.steps = params.steps.min(config.seq_len);
        }
        let ids: Vec<SeqId> = (self.next_id..self.next_id + n.max(1) as u64).collect();
        self.next_id += ids.len() as u64;
        let mut request = Request::new(ids[0], prompt, params);
        request.siblings = (1..ids.len())
            .map(|k| {
                let seed = request.params.sampler.seed.wrapping_add(k as u64);
                let sampler = SamplerConfig {
                    seed,
                    ..request.params.sampler.clone()
                };
                (ids[k], sampler)
            })
            .collect();
        self.waiting.push_back(request);
        ids
    }

    /// Starts a new request as a copy of running request `parent` (its prompt prefilled,
    /// decoding): the same tokens so far and positions in the cache, sharing every block
    /// of `parent` until one of them writes to the shared last block, which then gets its
    /// own copy. The new request samples with `sampler` from its next token on (a new
    /// sampler: its random draws start from the seed) and otherwise has `parent`'s
    /// parameters; its tokens are reported under the returned id. Parallel sampling: `n`
    /// completions of one prompt prefill it once.
    ///
    /// # Errors
    ///
    /// When `parent` is not running (waiting, prefilling, finished or unknown), or the
    /// engine already runs [`EngineConfig::max_running`] requests (counting those the
    /// prompt being prefilled will start).
    pub fn fork(&mut self, parent: SeqId, sampler: SamplerConfig) -> Result<SeqId, RunError> {
        let reserved = self.prefilling.as_ref().map_or(0, Request::group);
        if self.running.len() + reserved >= self.config.max_running {
            return Err(format!(
                "request {parent} cannot fork: {} requests run, the most the engine runs",
                self.running.len()
            ));
        }
        let Some(from) = self.running.iter().find(|r| r.id == parent) else {
            return Err(format!(
                "request {parent} cannot fork: only a running request (its prompt prefilled) forks"
            ));
        };
        let id = self.next_id;
        self.next_id += 1;
        self.admissions += 1;
        let child = from.child(id, sampler, self.admissions);
        self.blocks.fork(parent, id);
        self.running.push(child);
        Ok(id)
    }

    /// Cancels request `id` (waiting, prefilling or running, or a completion of
    /// [`Engine::add_request_n`] not yet started); returns whether it existed. Cancelling
    /// one completion of a group leaves the others to run: a waiting group's next
    /// completion takes the first one's place, and a prefilling one finishes the prompt
    /// for the others without producing a token.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        if self
            .prefilling
            .as_ref()
            .is_some_and(|r| r.id == id && r.cancelled)
        {
            // Already cancelled; it prefills for its group.
            return false;
        }
        let unstarted = self.waiting.iter_mut().chain(self.prefilling.as_mut());
        let siblings: usize = unstarted
            .map(|r| {
                let before = r.siblings.len();
                r.siblings.retain(|(s, _)| *s != id);
                before - r.siblings.len()
            })
            .sum();
        if siblings > 0 {
            // A cancelled prefill left with no one to prefill for ends now.
            if let Some(req) = self
                .prefilling
                .take_if(|r| r.cancelled && r.siblings.is_empty())
            {
                self.blocks.abort(req.id, req.computed);
            }
            return true;
        }
        let leader = |r: &&mut Request| r.id == id && !r.siblings.is_empty();
        if let Some(req) = self.waiting.iter_mut().find(leader) {
            let (next, sampler) = req.siblings.remove(0);
            req.id = next;
            req.sampler = Sampler::new(sampler.clone());
            req.params.sampler = sampler;
            return true;
        }
        if let Some(req) = self.prefilling.as_mut().filter(leader) {
            req.cancelled = true;
            return true;
        }
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|r| r.id != id);
        self.running.retain(|r| r.id != id);
        let prefilling = self.prefilling.take_if(|r| r.id == id);
        match &prefilling {
            // Its later prompt blocks are registered but not written.
            Some(req) => self.blocks.abort(id, req.computed),
            None => self.blocks.finish(id),
        }
        prefilling.is_some() || before != self.waiting.len() + self.running.len()
    }

    /// Whether any request is waiting, prefilling or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || self.prefilling.is_some() || !self.running.is_empty()
    }

    /// The engine's counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The block manager (for inspection).
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// The token times of finished requests.
    pub fn finished_times(&self) -> &[(SeqId, Vec<Instant>)] {
        &self.finished_times
    }

    fn table(&self, id: SeqId) -> Vec<i64> {
        self.blocks
            .table(id)
            .unwrap_or(&[])
            .iter()
            .map(|&b| i64::from(b))
            .collect()
    }

    /// Runs one scheduling step; returns the tokens produced and the requests finished.
    pub fn step(&mut self) -> Result<Vec<Event>, RunError> {
        self.stats.steps += 1;
        let mut events = Vec::new();
        self.admit_and_prefill(&mut events)?;
        self.decode(&mut events)?;
        // The peak is reached after the appends, before windows release blocks.
        let used = self.blocks.used();
        if used > self.stats.peak_blocks {
            self.stats.peak_blocks = used;
            self.stats.tokens_at_peak = self.blocks.tokens_held();
        }
        self.slide_windows();
        Ok(events)
    }

    /// Under a sliding window of `W`, releases each running sequence's blocks before
    /// position `len + 1 - W`, which no later query sees.
    fn slide_windows(&mut self) {
        let Some(window) = self.model.config().sliding_window else {
            return;
        };
        for req in &self.running {
            let visible_from = (req.computed + 1).saturating_sub(window);
            self.blocks.release_before(req.id, visible_from);
        }
    }

    /// Spends the step's prompt-token budget: first on the request whose prefill an
    /// earlier step left unfinished, then on admitting waiting requests, each prefilled
    /// in chunks of what the budget has left ([`Engine::prefill_chunk`]).
    fn admit_and_prefill(&mut self, events: &mut Vec<Event>) -> Result<(), RunError> {
        let mut budget = self.config.max_step_tokens.max(1);
        if let Some(req) = self.prefilling.take() {
            budget = self.prefill_chunk(req, budget, events)?;
        }
        while self.prefilling.is_none()
            && budget > 0
            && self.running.len() < self.config.max_running
        {
            let Some(req) = self.waiting.front() else {
                break;
            };
            if self.running.len() + req.group() > self.config.max_running {
                break;
            }
            let take = req.prompt_positions();
            let mut req = self.waiting.pop_front().expect("non-empty queue");
            let cached = match self.blocks.admit(req.id, &req.tokens[..take]) {
                Ok(c) => c,
                Err(_) if self.running.is_empty() => {
                    return Err(format!(
                        "request {} needs {} positions, more than the KV pool of {} blocks holds",
                        req.id,
                        take,
                        self.blocks.num_blocks()
                    ));
                }
                Err(_) => {
                    self.waiting.push_front(req);
                    break;
                }
            };
            self.stats.cached_prompt_tokens += cached;
            self.admissions += 1;
            req.admitted = self.admissions;
            req.computed = cached;
            budget = self.prefill_chunk(req, budget, events)?;
        }
        Ok(())
    }

    /// Prefills the next prompt positions of admitted request `req`, as many as `budget`
    /// allows (at least one), in one `@prefill` call over the positions before them in
    /// the cache; returns the budget left. A request whose prompt is done produces its
    /// first token and runs; another waits in `prefilling` for the next step.
    fn prefill_chunk(
        &mut self,
        mut req: Request,
        budget: usize,
        events: &mut Vec<Event>,
    ) -> Result<usize, RunError> {
        let take = req.prompt_positions();
        let end = take.min(req.computed + budget.max(1));
        let table = self.table(req.id);
        let positions: Vec<i64> = (req.computed..end).map(|p| p as i64).collect();
        let slots = positions
            .iter()
            .map(|&p| table[p as usize / BLOCK_SIZE] * BLOCK_SIZE as i64 + p % BLOCK_SIZE as i64)
            .collect();
        let batch = Batch {
            tokens: req.tokens[req.computed..end].to_vec(),
            positions,
            slots,
            tables: vec![table],
            context_lens: vec![end as i64],
        };
        let cache = self.cache.take().ok_or("the KV cache is missing")?;
        let (rows, cache) = self.model.run(Step::Prefill, &batch, cache)?;
        self.cache = Some(cache);
        self.stats.prefill_calls += 1;
        self.stats.prefilled_tokens += end - req.computed;
        let left = budget.saturating_sub(end - req.computed);
        req.computed = end;
        if end < take {
            self.prefilling = Some(req);
            return Ok(left);
        }
        let last = rows.last().ok_or("prefill returned no logits")?;
        for (id, sampler) in std::mem::take(&mut req.siblings) {
            self.admissions += 1;
            let mut sibling = req.child(id, sampler, self.admissions);
            self.blocks.fork(req.id, id);
            if self.produce(&mut sibling, last, events) {
                self.running.push(sibling);
            }
        }
        if req.cancelled {
            self.blocks.finish(req.id);
        } else if self.produce(&mut req, last, events) {
            self.running.push(req);
        }
        Ok(left)
    }

    /// Samples `req`'s next token from `logits`; returns whether the request goes on.
    fn produce(&mut self, req: &mut Request, logits: &[f32], events: &mut Vec<Event>) -> bool {
        let done = |req: &Request| req.computed >= req.params.steps;
        if req.computed < req.tokens.len() {
            // A request truncated by `steps` inside its prompt produces nothing more.
            self.finish(req, events);
            return false;
        }
        let token = req.sampler.sample(logits) as u32;
        if req.params.stop_tokens.contains(&token) {
            self.finish(req, events);
            return false;
        }
        let prev = *req.tokens.last().unwrap_or(&BOS);
        req.tokens.push(token);
        req.token_times.push(Instant::now());
        events.push(Event::Token {
            id: req.id,
            prev,
            token,
        });
        if done(req) {
            self.finish(req, events);
            return false;
        }
        req.pending = Some(token);
        true
    }

    fn finish(&mut self, req: &mut Request, events: &mut Vec<Event>) {
        self.blocks.finish(req.id);
        events.push(Event::Finished { id: req.id });
        self.finished_times
            .push((req.id, std::mem::take(&mut req.token_times)));
    }

    /// Copies block `from` to block `to` in every layer of the cache (copy-on-write).
    fn copy_block(&mut self, from: u32, to: u32) -> Result<(), RunError> {
        match self.cache.as_mut() {
            Some(cache) => self.model.copy_block(cache, from as usize, to as usize),
            None => Ok(()),
        }
    }

    fn decode(&mut self, events: &mut Vec<Event>) -> Result<(), RunError> {
        let mut batch = Batch::default();
        let mut order = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let (id, token) = (self.running[i].id, self.running[i].pending.unwrap_or(BOS));
            match self.blocks.append(id, token) {
                Ok(slot) => {
                    if let Some((from, to)) = slot.copy {
                        self.copy_block(from, to)?;
                        self.stats.block_copies += 1;
                    }
                    let pos = self.running[i].computed as i64;
                    batch.tokens.push(token);
                    batch.positions.push(pos);
                    batch.slots.push(slot.slot as i64);
                    batch.context_lens.push(pos + 1);
                    order.push(id);
                    i += 1;
                }
                Err(_) => {
                    // Preempt the most recently admitted sequence (possibly this one).
                    let victim = (0..self.running.len())
                        .max_by_key(|&j| self.running[j].admitted)
                        .unwrap_or(i);
                    let mut req = self.running.remove(victim);
                    self.blocks.finish(req.id);
                    // A victim already placed in this batch leaves it; the scan moves back by one.
                    if victim < i {
                        if let Some(k) = order.iter().position(|&o| o == req.id) {
                            order.remove(k);
                            batch.tokens.remove(k);
                            batch.positions.remove(k);
                            batch.slots.remove(k);
                            batch.context_lens.remove(k);
                        }
                        i -= 1;
                    }
                    req.computed = 0;
                    req.pending = None;
                    self.stats.preemptions += 1;
                    self.waiting.push_front(req);
                }
            }
        }
        if order.is_empty() {
            return Ok(());
        }
        batch.tables = order.iter().map(|&id| self.table(id)).collect();
        let cache = self.cache.take().ok_or("the KV cache is missing")?;
        let (rows, cache) = self.model.run(Step::Decode, &batch, cache)?;
        self.cache = Some(cache);
        let mut still = Vec::with_capacity(self.running.len());
        for mut req in std::mem::take(&mut self.running) {
            match order.iter().position(|&o| o == req.id) {
                Some(row) => {
                    req.computed += 1;
                    req.pending = None;
                    if self.produce(&mut req, &rows[row], events) {
                        still.push(req);
                    }
                }
                None => still.push(req),
            }
        }
        self.running = still;
        Ok(())
    }
}
