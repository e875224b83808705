//! The llama2.c tokenizer (`tokenizer.bin`): byte-pair merges chosen by score.
//!
//! The file holds `max_token_length: i32`, then for each of the model's `vocab` tokens a
//! score `f32`, a length `i32` and that many bytes. Encoding and decoding follow llama2.c's
//! `run.c` exactly: a BOS token, a dummy-prefix space token, one token per UTF-8 code point
//! (or one `<0xNN>` byte token per byte, id `byte + 3`, when the code point is not in the
//! vocabulary), then repeatedly merging the adjacent pair whose concatenation is the
//! highest-scoring vocabulary entry.

use std::{collections::HashMap, path::Path};

use crate::weights::LoadError;

/// Beginning-of-sequence token id of llama2.c's vocabularies (and Llama 2's).
pub const BOS: u32 = 1;
/// End-of-sequence token id of llama2.c's vocabularies (and Llama 2's).
pub const EOS: u32 = 2;

/// A llama2.c tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    lookup: HashMap<Vec<u8>, u32>,
    stops: Vec<u32>,
    /// The beginning- and end-of-sequence tokens.
    bos: u32,
    eos: u32,
    /// Whether an encoding asked for BOS begins with it (a GGUF vocabulary's
    /// `tokenizer.ggml.add_bos_token` may say no).
    leading_bos: bool,
}

impl Tokenizer {
    /// Reads `tokenizer.bin` for a model with `vocab` tokens.
    pub fn load(path: &Path, vocab: usize) -> Result<Tokenizer, LoadError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| LoadError {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&bytes, vocab).map_err(|message| LoadError { file, message })
    }

    /// Parses the bytes of a `tokenizer.bin` with `vocab` tokens.
    pub fn parse(bytes: &[u8], vocab: usize) -> Result<Tokenizer, String> {
        let mut reader = Reader { bytes, at: 0 };
        let max_len = reader.i32("max_token_length")?;
        if max_len <= 0 || max_len > 1 << 16 {
            return Err(format!(
                "max_token_length {max_len} at byte offset 0 is out of range"
            ));
        }
        let mut pieces = Vec::with_capacity(vocab);
        let mut scores = Vec::with_capacity(vocab);
        for id in 0..vocab {
            let score = f32::from_bits(reader.i32(&format!("the score of token {id}"))? as u32);
            let offset = reader.at;
            let len = reader.i32(&format!("the length of token {id}"))?;
            if len < 0 || len > max_len {
                return Err(format!(
                    "token {id} has length {len} at byte offset {offset}, outside 0..={max_len}"
                ));
            }
            pieces.push(
                reader
                    .take(len as usize, &format!("the bytes of token {id}"))?
                    .to_vec(),
            );
            scores.push(score);
        }
        Ok(Tokenizer::from_vocab(pieces, scores))
    }

    /// A tokenizer over the given token pieces (bytes) and merge scores.
    pub fn from_vocab(pieces: Vec<Vec<u8>>, scores: Vec<f32>) -> Tokenizer {
        let mut lookup = HashMap::with_capacity(pieces.len());
        for (id, piece) in pieces.iter().enumerate() {
            lookup.entry(piece.clone()).or_insert(id as u32);
        }
        Tokenizer {
            pieces,
            scores,
            lookup,
            stops: vec![BOS],
            bos: BOS,
            eos: EOS,
            leading_bos: true,
        }
    }

    /// The tokenizer with `stops` as the tokens that end a generation (BOS alone by
    /// default, as in `run.c`).
    pub fn with_stop_tokens(self, stops: Vec<u32>) -> Tokenizer {
        Tokenizer { stops, ..self }
    }

    /// The tokenizer with `bos` and `eos` as its beginning- and end-of-sequence tokens
    /// ([`BOS`] and [`EOS`] by default), as a GGUF file's metadata names them.
    pub fn with_bos_eos(self, bos: u32, eos: u32) -> Tokenizer {
        Tokenizer { bos, eos, ..self }
    }

    /// The tokenizer whose encodings never begin with BOS (which still ends generations
    /// where it is a stop token), for a vocabulary whose model takes prompts without it.
    pub fn without_leading_bos(self) -> Tokenizer {
        Tokenizer {
            leading_bos: false,
            ..self
        }
    }

    /// Number of tokens.
    pub fn vocab(&self) -> usize {
        self.pieces.len()
    }

    fn id_of(&self, bytes: &[u8]) -> Option<u32> {
        self.lookup.get(bytes).copied()
    }

    /// Encodes `text` as run.c does, with a leading BOS when `bos` (and the tokenizer has
    /// one: [`Tokenizer::without_leading_bos`]) and a trailing EOS when `eos`.
    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        let mut tokens = Vec::new();
        if bos && self.leading_bos {
            tokens.push(self.bos);
        }
        if !text.is_empty()
            && let Some(space) = self.id_of(b" ")
        {
            tokens.push(space);
        }
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let mut end = i + 1;
            while end < bytes.len() && bytes[end] & 0xC0 == 0x80 && end - i < 4 {
                end += 1;
            }
            let unit = &bytes[i..end];
            match self.id_of(unit) {
                Some(id) => tokens.push(id),
                None => tokens.extend(unit.iter().map(|&b| u32::from(b) + 3)),
            }
            i = end;
        }
        loop {
            let mut best: Option<(f32, u32, usize)> = None;
            for i in 0..tokens.len().saturating_sub(1) {
                let mut merged = self.piece(tokens[i]).to_vec();
                merged.extend_from_slice(self.piece(tokens[i + 1]));
                if let Some(id) = self.id_of(&merged) {
                    let score = self.scores[id as usize];
                    if best.is_none_or(|(s, _, _)| score > s) {
                        best = Some((score, id, i));
                    }
                }
            }
            let Some((_, id, i)) = best else { break };
            tokens[i] = id;
            tokens.remove(i + 1);
        }
        if eos {
            tokens.push(self.eos);
        }
        tokens
    }

    /// The bytes of token `id` as stored (empty for an out-of-range id).
    pub fn piece(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The bytes printed for `token` after `prev`, as run.c's `decode` + `safe_printf`:
    /// the leading space of a piece after BOS is dropped, `<0xNN>` pieces become the byte,
    /// text ends at a NUL byte, and lone bytes that are neither printable nor whitespace
    /// print nothing.
    pub fn decode(&self, prev: u32, token: u32) -> Vec<u8> {
        let mut piece = self.piece(token);
        if prev == self.bos && piece.first() == Some(&b' ') {
            piece = &piece[1..];
        }
        let byte;
        if let Some(b) = parse_byte_piece(piece) {
            byte = [b];
            piece = &byte;
        }
        let piece = match piece.iter().position(|&b| b == 0) {
            Some(nul) => &piece[..nul],
            None => piece,
        };
        match piece {
            [] => vec![],
            [b] if !(b.is_ascii_graphic()
                || *b == b' '
                || b.is_ascii_whitespace()
                || *b == 0x0B) =>
            {
                vec![]
            }
            p => p.to_vec(),
        }
    }
}

/// Reads little-endian fields, reporting truncation with the byte offset.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.bytes.len() - self.at < n {
            return Err(format!(
                "truncated at byte offset {}: expected {n} more bytes for {what}",
                self.at
            ));
        }
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }

    fn i32(&mut self, what: &str) -> Result<i32, String> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// `<0xNN>` (one or two hex digits, like run.c's `sscanf("<0x%02hhX>")`).
fn parse_byte_piece(piece: &[u8]) -> Option<u8> {
    let rest = piece.strip_prefix(b"<0x")?;
    let digits: Vec<u8> = rest
        .iter()
        .take(2)
        .copied()
        .take_while(u8::is_ascii_hexdigit)
        .collect();
    if digits.is_empty() {
        return None;
    }
    u8::from_str_radix(std::str::from_utf8(&digits).ok()?, 16).ok()
}

/// Text to token ids and back: what generation needs of a tokenizer.
pub trait TextCodec {
    /// Number of tokens.
    fn vocab(&self) -> usize;
    /// Encodes `text`, with a leading BOS when `bos` and a trailing EOS when `eos`.
    fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32>;
    /// The bytes printed for `token` after `prev`.
    fn decode(&self, prev: u32, token: u32) -> Vec<u8>;
    /// The tokens that end a generation when the model produces them.
    fn stop_tokens(&self) -> Vec<u32>;
}

impl TextCodec for Tokenizer {
    fn vocab(&self) -> usize {
        Tokenizer::vocab(self)
    }

    fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        Tokenizer::encode(self, text, bos, eos)
    }

    fn decode(&self, prev: u32, token: u32) -> Vec<u8> {
        Tokenizer::decode(self, prev, token)
    }

    fn stop_tokens(&self) -> Vec<u32> {
        self.stops.clone()
    }
}

/// A Hugging Face `tokenizer.json`, through the `tokenizers` crate.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Each token's bytes, for a byte-level vocabulary ([`byte_pieces`]): such a token
    /// decodes alone, so a character whose bytes two tokens share prints whole once both
    /// have printed.
    byte_pieces: Option<Vec<Vec<u8>>>,
    /// Tokens that end a generation besides BOS and EOS (an instruction-tuned model's
    /// end of turn).
    more_stops: Vec<u32>,
}

impl HfTokenizer {
    /// Reads `tokenizer.json`.
    pub fn load(path: &Path) -> Result<HfTokenizer, LoadError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| LoadError {
            file: path.display().to_string(),
            message: format!("invalid tokenizer.json: {e}"),
        })?;
        let bos = ["<s>", "<|begin_of_text|>", "<bos>"]
            .iter()
            .find_map(|t| inner.token_to_id(t));
        let eos = ["</s>", "<|end_of_text|>", "<eos>"]
            .iter()
            .find_map(|t| inner.token_to_id(t));
        Ok(HfTokenizer::from_parts(inner, bos, eos))
    }

    /// `inner` with its BOS and EOS; a byte-level decoder's tokens decode to their own
    /// bytes ([`byte_pieces`]).
    fn from_parts(inner: tokenizers::Tokenizer, bos: Option<u32>, eos: Option<u32>) -> Self {
        let byte_level = matches!(
            inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let byte_pieces = byte_level.then(|| byte_pieces(&inner));
        HfTokenizer {
            inner,
            bos,
            eos,
            byte_pieces,
            more_stops: Vec::new(),
        }
    }

    /// The same vocabulary, also ending generations at `stops` (ids outside the
    /// vocabulary are dropped).
    pub fn with_stop_tokens(mut self, stops: &[u32]) -> HfTokenizer {
        let vocab = self.inner.get_vocab_size(true);
        self.more_stops = stops
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab)
            .collect();
        self
    }

    /// A byte-level BPE vocabulary (GPT-2's scheme, which Llama 3 uses): `tokens` in
    /// GPT-2's byte-to-character encoding (id = position), `merges` in priority order,
    /// the regexes `splits` that split text into words before the merges, in turn (each
    /// splitting the pieces of the one before; a word that is a token is taken whole,
    /// without merging, when `whole_words`, as Llama 3's `ignore_merges` says), the
    /// `special` tokens matched whole in text, and BOS and EOS.
    ///
    /// # Errors
    ///
    /// A merge of tokens outside the vocabulary, a split that is not a regex, or a
    /// special id outside the vocabulary.
    pub fn byte_level_bpe(
        tokens: &[String],
        merges: Vec<(String, String)>,
        (splits, whole_words): (&[&str], bool),
        special: &[u32],
        (bos, eos): (Option<u32>, Option<u32>),
    ) -> Result<HfTokenizer, String> {
        use tokenizers::{
            AddedToken,
            models::bpe::{BPE, Vocab},
            pre_tokenizers::{byte_level::ByteLevel, sequence::Sequence},
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(whole_words)
            .build()
            .map_err(|e| format!("the BPE merges: {e}"))?;
        let mut steps = regex_splits(splits)?;
        steps.push(ByteLevel::new(false, true, false).into());
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(Sequence::new(steps)));
        inner.with_decoder(Some(ByteLevel::default()));
        let special = special
            .iter()
            .map(|&id| {
                tokens
                    .get(id as usize)
                    .map(|t| AddedToken::from(t.clone(), true))
                    .ok_or_else(|| format!("special token {id} is outside the vocabulary"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        inner
            .add_special_tokens(special)
            .map_err(|e| format!("the special tokens: {e}"))?;
        Ok(HfTokenizer::from_parts(inner, bos, eos))
    }
}

/// Pre-tokenizer steps that split text by each of `patterns` in turn, each match and each
/// run between matches a piece.
///
/// # Errors
///
/// A pattern that is not a regex.
pub(crate) fn regex_splits(
    patterns: &[&str],
) -> Result<Vec<tokenizers::pre_tokenizers::PreTokenizerWrapper>, String> {
    use tokenizers::{
        SplitDelimiterBehavior,
        pre_tokenizers::split::{Split, SplitPattern},
    };
    patterns
        .iter()
        .map(|pattern| {
            Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|e| format!("the pre-tokenizer pattern {pattern:?}: {e}"))
        })
        .collect()
}

impl TextCodec for HfTokenizer {
    fn vocab(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();
        if bos && let Some(b) = self.bos {
            ids.insert(0, b);
        }
        if eos && let Some(e) = self.eos {
            ids.push(e);
        }
        ids
    }

    /// The text `token` adds after `prev`: a byte-level token's own bytes, else decoding
    /// both and removing `prev`'s text (so decoders that depend on the neighbour, like
    /// SentencePiece's leading space, are right).
    fn decode(&self, prev: u32, token: u32) -> Vec<u8> {
        if let Some(pieces) = &self.byte_pieces {
            return pieces.get(token as usize).cloned().unwrap_or_default();
        }
        let alone = self.inner.decode(&[prev], true).unwrap_or_default();
        let both = self.inner.decode(&[prev, token], true).unwrap_or_default();
        both.strip_prefix(alone.as_str())
            .unwrap_or(&both)
            .as_bytes()
            .to_vec()
    }

    /// BOS (which ends a llama2.c-style generation) and EOS, where the vocabulary has them,
    /// and the model's other stop tokens ([`HfTokenizer::with_stop_tokens`]).
    fn stop_tokens(&self) -> Vec<u32> {
        let mut stops: Vec<u32> = self.bos.into_iter().chain(self.eos).collect();
        for &t in &self.more_stops {
            if !stops.contains(&t) {
                stops.push(t);
            }
        }
        stops
    }
}

/// The bytes of every token of a byte-level vocabulary, by id: a vocabulary token's
/// characters mapped back through GPT-2's byte-to-character table (printable Latin-1 bytes
/// show as themselves, the other 68 bytes as U+0100 onwards in byte order), an added
/// token's text as it is, and nothing for a special token (as decoding skips them).
fn byte_pieces(inner: &tokenizers::Tokenizer) -> Vec<Vec<u8>> {
    let shown = |b: u8| matches!(b, 33..=126 | 161..=172 | 174..=255);
    let hidden: Vec<u8> = (0..=255u8).filter(|&b| !shown(b)).collect();
    let byte_of = |c: char| match c as u32 {
        c @ 0..=255 if shown(c as u8) => Some(c as u8),
        c => hidden.get((c as usize).checked_sub(256)?).copied(),
    };
    let mut pieces = vec![Vec::new(); inner.get_vocab_size(true)];
    let added = inner.get_added_tokens_decoder();
    for (token, id) in inner.get_vocab(true) {
        let Some(piece) = pieces.get_mut(id as usize) else {
            continue;
        };
        *piece = match added.get(&id) {
            Some(t) if t.special => Vec::new(),
            Some(t) => t.content.clone().into_bytes(),
            None => token
                .chars()
                .map(byte_of)
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| token.clone().into_bytes()),
        };
    }
    pieces
}
