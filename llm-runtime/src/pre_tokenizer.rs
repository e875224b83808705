//! The pre-tokenizers of byte-level BPE vocabularies, by the names GGUF files give them
//! (`tokenizer.ggml.pre`, llama.cpp's converter's names): the regexes that split text
//! into words before the merges, as the models' Hugging Face `tokenizer.json` files give
//! them, and whether a word that is a token is taken whole.

/// A pre-tokenizer: `splits` split the text in turn (each one the pieces of the one
/// before, every match and every run between matches a piece), and with `whole_words` a
/// word that is a token is taken whole, without merging (Llama 3's `ignore_merges`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PreTokenizer {
    /// The regexes, in turn.
    pub splits: &'static [&'static str],
    /// A word that is a token is taken whole.
    pub whole_words: bool,
    /// Prompts begin with BOS where the file does not say (`tokenizer.ggml.add_bos_token`):
    /// llama.cpp's default for the family.
    pub adds_bos: bool,
}

/// GPT-2's: contractions, letters, digits and other runs, each with one leading space,
/// and whitespace.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's: as GPT-2's, but contractions in any case, a letter run led by one
/// non-letter, and digits three at a time.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's: Llama 3's, with digits one at a time.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's (`o200k`, Phi-4's and Llama 4's): letter runs split where lower case turns to
/// upper case, a contraction kept with its word, digits three at a time.
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken (Mistral Nemo's): GPT-4o's case split without contractions, digits
/// one at a time.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's default (for a file that names no pre-tokenizer, or `default`): runs of
/// punctuation, GPT-2's words without its last whitespace rule, digit runs, and three
/// ASCII digits, in turn.
const LLAMA_CPP_DEFAULT: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// Falcon's (`falcon`, as llama.cpp lists them): runs of punctuation, of `$+<=>^~|` and
/// the backtick, GPT-2's words without its last whitespace rule, and three ASCII digits,
/// in turn: llama.cpp's default with the backtick in the first run and no digit-run
/// split.
const FALCON: [&str; 3] = [
    r"[\p{P}\$\+<=>\^~\|`]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"[0-9][0-9][0-9]",
];

/// Each digit alone (StarCoder's and SmolLM's first split, before GPT-2's).
const DIGITS: &str = r"\p{N}";

/// DeepSeek-V3's three splits: digits three at a time, then runs of CJK ideographs and
/// kana, then words, with a punctuation mark leading a run of ASCII letters.
const DEEPSEEK_V3: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

/// DeepSeek Coder's (`deepseek-coder`), as its `tokenizer.json` splits: line breaks
/// alone, letter runs and punctuation runs each with a leading whitespace, runs of CJK
/// ideographs (U+4E00 to U+9FA5), of U+0800 to U+4E00 and of Hangul (U+AC00 to U+D7FF),
/// and each digit alone, in turn.
const DEEPSEEK_CODER: [&str; 5] = [
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
    r"\p{N}",
];

impl PreTokenizer {
    /// The pre-tokenizer GGUF's `tokenizer.ggml.pre` names `name` (llama.cpp's names,
    /// the aliases it reads as the same included, and `gpt2` for GPT-2's), or `None` for
    /// one not known here (which current llama.cpp refuses too). A file without the key
    /// takes `default`.
    pub fn named(name: &str) -> Option<PreTokenizer> {
        // Llama 3's and Tekken's families take whole words and begin prompts with BOS.
        let whole = |splits: &'static [&'static str]| PreTokenizer {
            splits,
            whole_words: true,
            adds_bos: true,
        };
        let merged = |splits: &'static [&'static str]| PreTokenizer {
            splits,
            whole_words: false,
            adds_bos: false,
        };
        Some(match name {
            "default" => merged(&LLAMA_CPP_DEFAULT),
            "falcon" => merged(&FALCON),
            "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion"
            | "granite-docling" | "exaone4" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" => merged(&[GPT2]),
            "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" => whole(&[LLAMA3]),
            // GLM-4's (`glm4`, `chatglm-bpe`) too: Llama 3's regex, its merges, no BOS.
            "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => merged(&[LLAMA3]),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "megrez" | "stablelm2" | "hunyuan"
            | "grok-2" => merged(&[QWEN2]),
            "gpt-4o" | "llama4" | "minimax-m2" => merged(&[GPT4O]),
            "tekken" => whole(&[TEKKEN]),
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" => merged(&[DIGITS, GPT2]),
            "deepseek-v3" | "hunyuan-dense" => merged(&DEEPSEEK_V3),
            "deepseek-coder" => merged(&DEEPSEEK_CODER),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use tokenizers::{
        OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _,
        pre_tokenizers::sequence::Sequence,
    };

    use super::*;

    /// The words `name`'s pre-tokenizer splits `text` into.
    fn words(name: &str, text: &str) -> Vec<String> {
        let pre = PreTokenizer::named(name).expect("a known pre-tokenizer");
        let splits = crate::tokenizer::regex_splits(pre.splits).expect("regexes");
        let mut pieces = PreTokenizedString::from(text);
        Sequence::new(splits)
            .pre_tokenize(&mut pieces)
            .expect("splits");
        pieces
            .get_splits(OffsetReferential::Original, OffsetType::Char)
            .into_iter()
            .map(|(word, ..)| word.to_string())
            .collect()
    }

    /// What sets each family apart, worked out by hand from its regexes: where case
    /// changes split words, whether contractions stay with their word, how many digits
    /// make a word, and DeepSeek-V3's ideograph runs and punctuation-led words.
    #[test]
    fn each_family_splits_as_its_regexes_say() {
        let text = "HelloWorld isn't 12345";
        assert_eq!(
            words("gpt-4o", text),
            ["Hello", "World", " isn't", " ", "123", "45"]
        );
        assert_eq!(
            words("llama-bpe", text),
            ["HelloWorld", " isn", "'t", " ", "123", "45"]
        );
        assert_eq!(
            words("qwen2", text),
            ["HelloWorld", " isn", "'t", " ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(
            words("tekken", text),
            ["Hello", "World", " isn", "'t", " ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(words("gpt2", text), ["HelloWorld", " isn", "'t", " 12345"]);
        // StarCoder's digits one at a time, then GPT-2's words.
        assert_eq!(words("smollm", "a12 b3"), ["a", "1", "2", " b", "3"]);
        assert_eq!(
            words("deepseek-v3", "12345中文ab.Hello"),
            ["123", "45", "中文", "ab", ".Hello"]
        );
        // DeepSeek Coder's: letters, punctuation (not the math symbol `=`), CJK runs,
        // then each digit, each split of what the one before left (so a CJK run comes
        // apart from the letters the letter split gave it).
        assert_eq!(
            words("deepseek-coder", "int x = 42;"),
            ["int", " x", " = ", "4", "2", ";"]
        );
        assert_eq!(words("deepseek-coder", "a你好1"), ["a", "你好", "1"]);
        // llama.cpp's default: punctuation runs first, then GPT-2's words, digit runs
        // and three digits at a time.
        assert_eq!(
            words("default", "can't 12345"),
            ["can", "'", "t", " ", "123", "45"]
        );
        // Falcon's: a backtick run is a word of its own, not joined by the space before
        // it as in llama.cpp's default.
        assert_eq!(words("falcon", "a `` b"), ["a", " ", "``", " b"]);
        assert_eq!(words("default", "a `` b"), ["a", " ``", " b"]);
        // Newlines after punctuation join it in Llama 3's and GPT-4o's, not GPT-2's.
        assert_eq!(words("llama3", "x.\n\ny"), ["x", ".\n\n", "y"]);
        assert_eq!(words("gpt-4o", "x.\n\ny"), ["x", ".\n\n", "y"]);
        assert_eq!(words("gpt2", "x.\n\ny"), ["x", ".", "\n", "\n", "y"]);
        // Llama 3's and Tekken's families take whole words and begin prompts with BOS;
        // the others neither, as llama.cpp has them.
        for name in ["llama-bpe", "llama3", "pixtral", "tekken"] {
            let pre = PreTokenizer::named(name).expect("known");
            assert!(pre.whole_words && pre.adds_bos, "{name}");
        }
        for name in [
            "gpt2",
            "qwen2",
            "gpt-4o",
            "smollm",
            "deepseek-v3",
            "default",
        ] {
            let pre = PreTokenizer::named(name).expect("known");
            assert!(!pre.whole_words && !pre.adds_bos, "{name}");
        }
        // Aliases read as llama.cpp reads them.
        assert_eq!(
            PreTokenizer::named("deepseek-r1-qwen"),
            PreTokenizer::named("qwen2")
        );
        assert_eq!(PreTokenizer::named("llama4"), PreTokenizer::named("gpt-4o"));
        let dbrx = PreTokenizer::named("dbrx").expect("known");
        assert_eq!(
            dbrx.splits,
            PreTokenizer::named("llama3").expect("known").splits
        );
        assert!(!dbrx.whole_words && !dbrx.adds_bos);
        for glm in ["glm4", "chatglm-bpe"] {
            assert_eq!(PreTokenizer::named(glm).as_ref(), Some(&dbrx), "{glm}");
        }
        assert_eq!(PreTokenizer::named("deepseek-llm"), None);
    }
}
