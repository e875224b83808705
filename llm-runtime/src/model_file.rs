//! Opening a model file of any supported format (chosen by the file's first bytes).

use std::path::Path;

use crate::{
    gguf, llama2c,
    model::ModelConfig,
    tokenizer::Tokenizer,
    weights::{LoadError, Weights},
};

/// A loaded model: configuration, weights and, for formats that embed one, a tokenizer.
pub struct LoadedModel {
    /// Hyperparameters.
    pub config: ModelConfig,
    /// Weights under the builder's names.
    pub weights: Weights,
    /// The embedded tokenizer, if the file has one.
    pub tokenizer: Option<Tokenizer>,
}

/// Opens `path`: GGUF when it starts with `GGUF`, otherwise a llama2.c checkpoint.
pub fn load(path: &Path) -> Result<LoadedModel, LoadError> {
    let file = path.display().to_string();
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == b"GGUF");
    if is_gguf {
        let m = gguf::load(path)?;
        return Ok(LoadedModel {
            config: m.config,
            weights: m.weights,
            tokenizer: m.tokenizer,
        });
    }
    let (config, weights) = llama2c::load(path).map_err(|e| LoadError {
        file,
        message: e.message,
    })?;
    Ok(LoadedModel {
        config,
        weights,
        tokenizer: None,
    })
}
