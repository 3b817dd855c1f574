//! Tokenization and chat templates with the ecosystem's own implementations:
//! Hugging Face's `tokenizers` crate reads a model folder's `tokenizer.json`
//! (or the one [`weights::HfTokenizerFiles`] builds from a GGUF's metadata),
//! and `minijinja` — the engine Hugging Face's text-generation-inference uses —
//! renders the model's Jinja chat template from `tokenizer_config.json` (or
//! the GGUF's `tokenizer.chat_template`).
//!
//! ```no_run
//! use s2ft_core::tokenizer::{ChatMessage, Tokenizer};
//! let tok = Tokenizer::from_model_path("models/SmolLM2-135M-Instruct".as_ref())?;
//! let prompt = tok.chat_prompt(&[ChatMessage::user("What is 2 + 2?")])?;
//! let ids = tok.encode(&prompt)?;
//! # Ok::<(), s2ft_core::S2ftError>(())
//! ```

use std::path::{Path, PathBuf};

use serde_json::Value;
use weights::{GgufFile, HfTokenizerFiles};

use crate::error::{Result, S2ftError};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
    /// An assistant turn.
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per turn.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Tokens that end a generated turn, in the order they are tried.
const STOP_TOKENS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
];

/// A model's tokenizer and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    files: HfTokenizerFiles,
    source: PathBuf,
    stop_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn tok_err(source: &Path, msg: impl std::fmt::Display) -> S2ftError {
    S2ftError::Tokenizer {
        path: source.to_path_buf(),
        msg: msg.to_string(),
    }
}

impl Tokenizer {
    /// From `tokenizer.json` and `tokenizer_config.json` values (`source`
    /// names where they came from in errors).
    pub fn from_files(files: HfTokenizerFiles, source: &Path) -> Result<Self> {
        let text = serde_json::to_string(&files.tokenizer).expect("JSON values serialise");
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| tok_err(source, format!("tokenizer.json is not understood: {e}")))?;
        let mut stop_ids: Vec<u32> = Vec::new();
        if let Some(eos) = special_token(&files.config, "eos_token")
            && let Some(id) = inner.token_to_id(&eos)
        {
            stop_ids.push(id);
        }
        for t in STOP_TOKENS {
            if let Some(id) = inner.token_to_id(t)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        Ok(Tokenizer {
            inner,
            files,
            source: source.to_path_buf(),
            stop_ids,
        })
    }

    /// From a Hugging Face folder: `tokenizer.json` (required) and
    /// `tokenizer_config.json` (optional: special tokens, chat template).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            let bytes = std::fs::read(&p).map_err(|e| tok_err(&p, e))?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| tok_err(&p, format!("not JSON: {e}")))
        };
        let tokenizer = read("tokenizer.json")?.ok_or_else(|| {
            tok_err(
                &dir.join("tokenizer.json"),
                "missing: the model folder has no tokenizer",
            )
        })?;
        let config = read("tokenizer_config.json")?.unwrap_or_else(|| serde_json::json!({}));
        Self::from_files(HfTokenizerFiles { tokenizer, config }, dir)
    }

    /// A byte-level tokenizer (one token per byte, no merges) with ChatML's
    /// special tokens `<|endoftext|>` (0), `<|im_start|>` (1), `<|im_end|>`
    /// (2, EOS) and the ChatML chat template SmolLM2-Instruct uses (without
    /// its default system turn): 259 tokens, for tiny random models in tests.
    pub fn byte_level_chatml() -> Result<Self> {
        let files = HfTokenizerFiles::byte_level(
            &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "<|im_end|>",
            Some(CHATML_TEMPLATE),
        )?;
        Self::from_files(files, Path::new("<byte-level ChatML tokenizer>"))
    }

    /// From a GGUF file's metadata (vocabulary, merges, special tokens, chat template).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        use weights::TensorSource;
        let files = HfTokenizerFiles::from_gguf(g)?;
        Self::from_files(files, g.path())
    }

    /// From a model path as [`crate::Pretrained::load`] accepts it: a Hugging Face
    /// folder (its `tokenizer.json`) or a GGUF file (its metadata).
    pub fn from_model_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else {
            Self::from_gguf(&GgufFile::open(path)?)
        }
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`)
    /// become their ids, and nothing is added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| tok_err(&self.source, format!("encoding {text:?}: {e}")))
    }

    /// The text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tok_err(&self.source, format!("decoding {ids:?}: {e}")))
    }

    /// The BOS token's text (`bos_token` of `tokenizer_config.json`), if the model has one.
    pub fn bos_token(&self) -> Option<String> {
        special_token(&self.files.config, "bos_token")
    }

    /// The id of a token string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end a generated turn: the configured EOS token, then those
    /// of `<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<|endoftext|>`, `</s>` the vocabulary has.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The Jinja chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.files
            .config
            .get("chat_template")
            .and_then(Value::as_str)
    }

    /// The files this tokenizer came from (to save next to a model).
    pub fn files(&self) -> &HfTokenizerFiles {
        &self.files
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        Ok(self.files.save(dir)?)
    }

    /// Renders `messages` with the model's chat template (`add_generation_prompt`
    /// appends the assistant header). Errors when the model has no template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template()
            .ok_or_else(|| tok_err(&self.source, "the model has no chat template"))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| tok_err(&self.source, format!("chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => special_token(&self.files.config, "bos_token").unwrap_or_default(),
            eos_token => special_token(&self.files.config, "eos_token").unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| tok_err(&self.source, format!("chat template: {e}")))
    }

    /// The prompt for `messages` as the model expects it: rendered with the
    /// chat template and the assistant header, or, for a model without a
    /// template, the turns' contents joined by newlines.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String> {
        if self.chat_template().is_some() {
            self.apply_chat_template(messages, true)
        } else {
            let mut s = messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            s.push('\n');
            Ok(s)
        }
    }

    /// What follows an assistant answer in the template (`<|im_end|>\n` for
    /// ChatML), found by rendering a conversation with and without a marked
    /// answer; for a model without a template, its first stop token.
    pub fn end_of_turn(&self) -> Result<String> {
        const MARK: &str = "\u{1}ANSWER\u{1}";
        if self.chat_template().is_some() {
            let user = ChatMessage::user("q");
            let full = self.apply_chat_template(&[user, ChatMessage::assistant(MARK)], false)?;
            let at = full.find(MARK).ok_or_else(|| {
                tok_err(&self.source, "chat template drops the assistant's answer")
            })?;
            Ok(full[at + MARK.len()..].to_string())
        } else {
            let id = *self
                .stop_ids
                .first()
                .ok_or_else(|| tok_err(&self.source, "no end-of-sequence token"))?;
            self.decode(&[id], false)
        }
    }
}

/// A special token of `tokenizer_config.json`: a string, or an object with `content`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}
