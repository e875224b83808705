//! The vocabulary a GGUF file embeds (`tokenizer.ggml.*`), by `tokenizer.ggml.model`:
//! SentencePiece (`llama`, Llama 2's) becomes a llama2.c [`Tokenizer`], and byte-level BPE
//! (`gpt2`, Llama 3's) a Hugging Face tokenizer built from the file's tokens and merges
//! ([`HfTokenizer::byte_level_bpe`]). Other models are refused: their pieces read either
//! way would give wrong tokens without a word of warning.

use crate::{
    gguf::{GgufFile, Meta},
    pre_tokenizer::PreTokenizer,
    tokenizer::{BOS, EOS, HfTokenizer, TextCodec, Tokenizer},
};

/// GGUF's token type of control tokens (`<|begin_of_text|>`) and of user-defined ones:
/// both are matched whole in text.
const SPECIAL_TYPES: [u64; 2] = [3, 4];

/// The file's vocabulary, if it has one (`tokenizer.ggml.tokens`).
pub(crate) fn vocab(g: &GgufFile) -> Result<Option<Box<dyn TextCodec>>, String> {
    let Some(Meta::Array(entries)) = g.meta("tokenizer.ggml.tokens") else {
        return Ok(None);
    };
    let tokens = entries
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            Meta::Str(s) => Ok(s.clone()),
            _ => Err(format!("tokenizer.ggml.tokens entry {i} is not a string")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let id = |key: &str| match g.meta(key).and_then(Meta::as_u64) {
        Some(id) => u32::try_from(id)
            .ok()
            .filter(|&id| (id as usize) < tokens.len())
            .map(Some)
            .ok_or_else(|| format!("{key} = {id} is not a token of the vocabulary")),
        None => Ok(None),
    };
    let ends = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
    );
    // An instruction-tuned model's end of turn and end of message end a generation too.
    let mut more_stops = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        more_stops.extend(id(key)?);
    }
    match g.meta("tokenizer.ggml.model") {
        None => sentencepiece(g, tokens, ends, &more_stops),
        Some(Meta::Str(model)) if model == "llama" => sentencepiece(g, tokens, ends, &more_stops),
        Some(Meta::Str(model)) if model == "gpt2" => byte_level_bpe(g, &tokens, ends, &more_stops),
        Some(other) => Err(format!(
            "tokenizer.ggml.model is {other:?}; SentencePiece (\"llama\") and byte-level BPE (\"gpt2\") vocabularies are read"
        )),
    }
}

/// Whether prompts begin with BOS: as `tokenizer.ggml.add_bos_token` says, else
/// `default` (llama.cpp's: SentencePiece vocabularies and some byte-level BPE families
/// do, [`PreTokenizer::adds_bos`]).
fn adds_bos(g: &GgufFile, default: bool) -> bool {
    match g.meta("tokenizer.ggml.add_bos_token") {
        Some(Meta::Bool(adds)) => *adds,
        _ => default,
    }
}

/// The SentencePiece vocabulary (`tokenizer.ggml.tokens` and `.scores`), with `▁` read as
/// a space as llama2.c's `tokenizer.bin` stores it, and the file's BOS and EOS (llama2.c's
/// 1 and 2 where it names none): prompts begin with BOS (unless [`adds_bos`] says no),
/// and generation ends at either (run.c ends it at BOS) or at one of `more_stops`.
fn sentencepiece(
    g: &GgufFile,
    tokens: Vec<String>,
    (bos, eos): (Option<u32>, Option<u32>),
    more_stops: &[u32],
) -> Result<Option<Box<dyn TextCodec>>, String> {
    let scores: Vec<f32> = match g.meta("tokenizer.ggml.scores") {
        Some(Meta::Array(s)) => s
            .iter()
            .map(|v| {
                if let Meta::Float(f) = v {
                    *f as f32
                } else {
                    0.0
                }
            })
            .collect(),
        _ => vec![0.0; tokens.len()],
    };
    if scores.len() != tokens.len() {
        return Err(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        ));
    }
    let pieces = tokens
        .into_iter()
        .map(|t| t.replace('\u{2581}', " ").into_bytes())
        .collect();
    let bos = bos.unwrap_or(BOS);
    let mut stops = vec![bos];
    for &t in eos.iter().chain(more_stops) {
        if !stops.contains(&t) {
            stops.push(t);
        }
    }
    let tokenizer = Tokenizer::from_vocab(pieces, scores)
        .with_bos_eos(bos, eos.unwrap_or(EOS))
        .with_stop_tokens(stops);
    Ok(Some(Box::new(if adds_bos(g, true) {
        tokenizer
    } else {
        tokenizer.without_leading_bos()
    })))
}

/// The byte-level BPE vocabulary: the tokens, `tokenizer.ggml.merges` (`"a b"` each, in
/// priority order), the pre-tokenizer `tokenizer.ggml.pre` names ([`PreTokenizer::named`];
/// none for llama.cpp's default; one not known there refused), the
/// control and user-defined tokens of `tokenizer.ggml.token_type` matched whole, BOS
/// (prepended to prompts as `tokenizer.ggml.add_bos_token` says, else as the
/// pre-tokenizer's family has it) and EOS, and
/// `more_stops` also ending a generation.
fn byte_level_bpe(
    g: &GgufFile,
    tokens: &[String],
    ends: (Option<u32>, Option<u32>),
    more_stops: &[u32],
) -> Result<Option<Box<dyn TextCodec>>, String> {
    let Some(Meta::Array(entries)) = g.meta("tokenizer.ggml.merges") else {
        return Err("a BPE vocabulary without tokenizer.ggml.merges".into());
    };
    let merges = entries
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Meta::Str(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("tokenizer.ggml.merges entry {i} is not two tokens")),
            _ => Err(format!("tokenizer.ggml.merges entry {i} is not a string")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let name = match g.meta("tokenizer.ggml.pre") {
        None => "default",
        Some(Meta::Str(name)) => name.as_str(),
        Some(other) => return Err(format!("tokenizer.ggml.pre is {other:?}, not a name")),
    };
    let pre = PreTokenizer::named(name).ok_or_else(|| {
        format!(
            "tokenizer.ggml.pre is {name:?}, a pre-tokenizer not read here (llama.cpp's for Llama 3, Qwen2, GPT-2, GPT-4o, Tekken, StarCoder and DeepSeek-V3 are, by their names and aliases)"
        )
    })?;
    // A vocabulary whose prompts take no BOS (Qwen2's) still ends generations at it.
    let (bos, eos) = ends;
    let mut stops = more_stops.to_vec();
    let ends = if adds_bos(g, pre.adds_bos) {
        ends
    } else {
        stops.extend(bos);
        (None, eos)
    };
    let special: Vec<u32> = match g.meta("tokenizer.ggml.token_type") {
        Some(Meta::Array(types)) => types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.as_u64().is_some_and(|t| SPECIAL_TYPES.contains(&t)))
            .map(|(i, _)| i as u32)
            .filter(|&i| (i as usize) < tokens.len())
            .collect(),
        _ => Vec::new(),
    };
    let tokenizer = HfTokenizer::byte_level_bpe(
        tokens,
        merges,
        (pre.splits, pre.whole_words),
        &special,
        ends,
    )?
    .with_stop_tokens(&stops);
    Ok(Some(Box::new(tokenizer)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `metadata` only.
    fn file(metadata: Vec<(&str, Meta)>) -> GgufFile {
        GgufFile {
            version: 3,
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            tensors: Vec::new(),
            data_start: 0,
        }
    }

    fn strings(items: &[&str]) -> Meta {
        Meta::Array(items.iter().map(|s| Meta::Str(s.to_string())).collect())
    }

    /// A small Llama 3-style vocabulary: words merge as the merges say, a space is `Ġ`,
    /// digits split three at a time, control tokens are matched whole, BOS leads a prompt,
    /// and decoding turns `Ġ` back into a space.
    #[test]
    fn byte_level_bpe_vocabularies_are_built_from_the_file() {
        let tokens = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "h",
            "e",
            "l",
            "o",
            "Ġ",
            "w",
            "r",
            "d",
            "he",
            "ll",
            "hell",
            "hello",
            "Ġw",
            "or",
            "Ġwor",
            "ld",
            "Ġworld",
            "1",
            "2",
            "3",
            "12",
            "123",
            "lo",
            "Ã",
            "©",
        ];
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3",
        ];
        let mut types = vec![Meta::Int(3), Meta::Int(3)];
        types.extend((2..tokens.len()).map(|_| Meta::Int(1)));
        let g = file(vec![
            ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Meta::Str("llama-bpe".into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.merges", strings(&merges)),
            ("tokenizer.ggml.token_type", Meta::Array(types)),
            ("tokenizer.ggml.bos_token_id", Meta::Uint(0)),
            ("tokenizer.ggml.eos_token_id", Meta::Uint(1)),
            ("tokenizer.ggml.eot_token_id", Meta::Uint(26)),
        ]);
        let tok = vocab(&g).expect("builds").expect("a vocabulary");
        assert_eq!(tok.encode("hello world", true, false), vec![0, 13, 18]);
        // "12312" is the words "123" and "12" (digits three at a time).
        assert_eq!(tok.encode("12312", false, false), vec![23, 22]);
        assert_eq!(
            tok.encode("hello<|end_of_text|>", false, false),
            vec![13, 1]
        );
        assert_eq!(tok.decode(13, 18), b" world".to_vec());
        // A word that is a token is taken whole, though no merge builds it.
        assert_eq!(tok.encode("lo", false, false), vec![24]);
        // "é" is the bytes C3 A9, shown as "Ã" and "©": each token decodes to its byte.
        assert_eq!(tok.encode("é", false, false), vec![25, 26]);
        assert_eq!(
            [tok.decode(0, 25), tok.decode(25, 26)].concat(),
            "é".as_bytes()
        );
        assert_eq!(
            tok.stop_tokens(),
            vec![0, 1, 26],
            "BOS, EOS and end of turn"
        );
        // A merge of unknown tokens and an unknown pre-tokenizer are refused.
        let bad = |key: &str, value: Meta| {
            let mut g = g.clone();
            for (k, v) in &mut g.metadata {
                if k == key {
                    *v = value.clone();
                }
            }
            vocab(&g).err().expect("refused")
        };
        let err = bad("tokenizer.ggml.merges", strings(&["x y"]));
        assert!(err.contains("the BPE merges"), "{err}");
        let err = bad("tokenizer.ggml.pre", Meta::Str("deepseek-llm".into()));
        assert!(
            err.contains("tokenizer.ggml.pre is \"deepseek-llm\", a pre-tokenizer not read here"),
            "{err}"
        );
        // Qwen2's pre-tokenizer splits digits one at a time (merges still join "he"),
        // and its prompts take no BOS, which still ends a generation.
        let mut qwen2 = g.clone();
        qwen2.metadata.retain(|(k, _)| k != "tokenizer.ggml.pre");
        qwen2.metadata.extend([
            ("tokenizer.ggml.pre".to_string(), Meta::Str("qwen2".into())),
            (
                "tokenizer.ggml.add_bos_token".to_string(),
                Meta::Bool(false),
            ),
        ]);
        let tok = vocab(&qwen2).expect("builds").expect("a vocabulary");
        assert_eq!(tok.encode("12312", true, false), vec![19, 20, 21, 19, 20]);
        assert_eq!(tok.encode("hello world", true, false), vec![13, 18]);
        assert_eq!(
            tok.stop_tokens(),
            vec![1, 26, 0],
            "EOS, end of turn and BOS"
        );
    }

    /// Other vocabulary models are refused; a file without tokens has no vocabulary.
    #[test]
    fn other_vocabularies_are_refused() {
        let model = |name: &str| {
            file(vec![
                ("tokenizer.ggml.model", Meta::Str(name.into())),
                ("tokenizer.ggml.tokens", strings(&["a"])),
            ])
        };
        assert!(vocab(&model("llama")).expect("reads").is_some());
        // A SentencePiece vocabulary may take prompts without BOS, which still stops.
        let mut no_bos = model("llama");
        no_bos.metadata.extend([
            (
                "tokenizer.ggml.tokens".to_string(),
                strings(&["<unk>", "<s>", "</s>", "a"]),
            ),
            (
                "tokenizer.ggml.add_bos_token".to_string(),
                Meta::Bool(false),
            ),
        ]);
        no_bos.metadata.remove(1);
        let tok = vocab(&no_bos).expect("reads").expect("a vocabulary");
        assert_eq!(tok.encode("a", true, false), vec![3]);
        assert!(tok.stop_tokens().contains(&1));
        no_bos.metadata.pop();
        let tok = vocab(&no_bos).expect("reads").expect("a vocabulary");
        assert_eq!(tok.encode("a", true, false), vec![1, 3]);
        let err = vocab(&model("bert")).err().expect("refused");
        assert!(
            err.contains("tokenizer.ggml.model is Str(\"bert\")"),
            "{err}"
        );
        assert!(vocab(&file(Vec::new())).expect("reads").is_none());
    }
}
