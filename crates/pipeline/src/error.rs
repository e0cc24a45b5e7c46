//! Errors of the pipeline layer: each variant names what was wrong with the input or checkpoint.

use std::path::PathBuf;

/// Everything that can go wrong loading a checkpoint or running a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the checkpoint directory must contain is absent.
    #[error("checkpoint file missing: {path} ({what})")]
    MissingFile { path: PathBuf, what: &'static str },
    /// `config.json` (or another json) could not be parsed or is inconsistent.
    #[error("invalid config {file}: {reason}")]
    Config { file: String, reason: String },
    /// `vision_config` names a tower this implementation does not know and gives no explicit shape.
    #[error("unknown vision tower '{0}' (known: siglip_large_patch16_384; or give width, layers, heads, mlp_ratio, patch_size in params)")]
    UnknownVisionTower(String),
    /// `gen_vision_config` names a VQ model this implementation does not know and gives no explicit shape.
    #[error("unknown VQ model '{0}' (known: VQ-16; or give ch, ch_mult, z_channels, num_res_blocks, codebook_size, codebook_embed_dim in params)")]
    UnknownVqModel(String),
    /// A weight is missing, has the wrong shape, or a weight file is unreadable or truncated.
    #[error("weights: {0}")]
    Weights(String),
    /// The tokenizer files are unusable (missing special tokens included).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An input image was refused.
    #[error("image {index}: {source}")]
    Image {
        index: usize,
        source: janus_imageproc::ImageError,
    },
    /// The number of images differs from the number of `<image_placeholder>` tags.
    #[error("conversation has {placeholders} <image_placeholder> tag(s) but {images} image(s)")]
    ImageCountMismatch { placeholders: usize, images: usize },
    /// The prompt (plus the tokens to generate) does not fit the context window.
    #[error("prompt of {prompt_tokens} tokens plus {max_new_tokens} new tokens exceeds the context window of {context} tokens")]
    PromptTooLong {
        prompt_tokens: usize,
        max_new_tokens: usize,
        context: usize,
    },
    /// A request parameter is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// A device or tensor operation failed.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// True for errors caused by the request rather than the server (maps to INVALID_ARGUMENT).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::Image { .. }
                | Self::ImageCountMismatch { .. }
                | Self::PromptTooLong { .. }
                | Self::InvalidArgument { .. }
        )
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
