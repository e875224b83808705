//! Running `llm` models: model import (llama2.c checkpoints), the model builder, the
//! tokenizer, the sampler, `.npy` I/O and single-sequence generation on the reference
//! interpreter.
//!
//! Besides the command-line package, this is the only crate that reads files.

pub mod baseline;
pub mod block_manager;
pub mod engine;
pub mod generate;
pub mod gguf;
mod gguf_vocab;
pub mod heap;
pub mod hf;
mod hf_deepseek;
mod hf_gemma;
mod hf_glm;
mod hf_gpt_oss;
mod hf_layer_norm;
mod hf_moe;
pub mod llama2c;
mod mmap;
pub mod model;
pub mod model_file;
pub mod npy;
mod pre_tokenizer;
mod rope_scaling;
pub mod sampler;
pub mod synth;
pub mod tokenizer;
pub mod weights;
