//! Opening a model of any supported format: a Hugging Face directory, GGUF (chosen by the
//! file's first bytes) or a llama2.c checkpoint.

use std::path::Path;

use crate::{
    gguf, llama2c,
    model::ModelConfig,
    tokenizer::TextCodec,
    weights::{LoadError, Weights},
};

/// A loaded model: configuration, weights and, for formats that embed one, a tokenizer.
pub struct LoadedModel {
    /// Hyperparameters.
    pub config: ModelConfig,
    /// Weights under the builder's names.
    pub weights: Weights,
    /// The embedded tokenizer, if the model has one.
    pub tokenizer: Option<Box<dyn TextCodec>>,
}

/// Opens `path`: a Hugging Face model directory, a GGUF file (starting with `GGUF`), or
/// otherwise a llama2.c checkpoint.
pub fn load(path: &Path) -> Result<LoadedModel, LoadError> {
    load_with(path, &mut |_| {})
}

/// [`load`], reporting the fraction read to `progress`.
pub fn load_with(path: &Path, progress: &mut dyn FnMut(f64)) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        return crate::hf::load_with(path, progress);
    }
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == b"GGUF");
    if is_gguf {
        let m = gguf::load_with(path, progress)?;
        return Ok(LoadedModel {
            config: m.config,
            weights: m.weights,
            tokenizer: m.tokenizer,
        });
    }
    let (config, weights) = llama2c::load_with(path, progress)?;
    Ok(LoadedModel {
        config,
        weights,
        tokenizer: None,
    })
}
