//! Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`)
//! from a GGUF file's `tokenizer.*` metadata, so that a model folder written
//! from a GGUF can be tokenized by `transformers`, by the `tokenizers` crate,
//! and by our own training code without going back to the GGUF.
//!
//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is covered, with the
//! pre-tokenizers llama.cpp names `smollm` (digits split one by one, then
//! GPT-2's byte-level split — what SmolLM's own `tokenizer.json` holds) and
//! `gpt-2`/`default` (GPT-2's byte-level split alone). Control tokens
//! (`token_type` 3) become special added tokens, user-defined ones (4) plain
//! added tokens, as `transformers`' GGUF loader does. Only JSON is built here
//! (no tokenizer library): the `tokenizers` crate and `transformers` read it.

use serde_json::{Value, json};

use crate::error::{Result, WeightsError};
use crate::gguf::{GgufFile, GgufValue};
use crate::tensor::TensorSource;

/// The two JSON files `transformers` needs to tokenize with a model folder.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTokenizerFiles {
    /// `tokenizer.json` (the `tokenizers` library's serialisation).
    pub tokenizer: Value,
    /// `tokenizer_config.json` (special tokens, chat template, class).
    pub config: Value,
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

impl HfTokenizerFiles {
    /// Builds both files from `g`'s metadata. Errors name the GGUF file and
    /// the key that is missing or not understood (a SentencePiece `llama`
    /// tokenizer, or a pre-tokenizer other than `smollm`/`gpt-2`/`default`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let kv = g.kv();
        let err = |msg: String| WeightsError::InvalidHeader {
            path: g.path().to_path_buf(),
            msg,
        };
        let model = kv
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| {
                err("'tokenizer.ggml.model' is missing: the file has no tokenizer".into())
            })?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2')"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            kv.get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| err(format!("'{key}' is missing or not an array")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| err(format!("'{key}' holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match kv.get("tokenizer.ggml.token_type") {
            Some(v) => {
                let a = v
                    .as_array()
                    .ok_or_else(|| err("'tokenizer.ggml.token_type' is not an array".into()))?;
                if a.len() != tokens.len() {
                    return Err(err(format!(
                        "'tokenizer.ggml.token_type' has {} entries for {} tokens",
                        a.len(),
                        tokens.len()
                    )));
                }
                a.iter().map(|t| t.as_u64().unwrap_or(1)).collect()
            }
            None => vec![1; tokens.len()],
        };
        let pre = kv
            .get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .unwrap_or("default");
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match pre {
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level,
            ]}),
            "gpt-2" | "gpt2" | "default" => byte_level,
            other => {
                return Err(err(format!(
                    "pre-tokenizer '{other}' (tokenizer.ggml.pre) is not supported \
                     (known: smollm, gpt-2, default)"
                )));
            }
        };
        let special_id = |key: &str| -> Result<Option<&str>> {
            match kv.get(key).and_then(GgufValue::as_u64) {
                None => Ok(None),
                Some(i) => tokens
                    .get(i as usize)
                    .map(|t| Some(t.as_str()))
                    .ok_or_else(|| {
                        err(format!(
                            "'{key}' = {i} is outside the {} tokens",
                            tokens.len()
                        ))
                    }),
            }
        };
        let bos = special_id("tokenizer.ggml.bos_token_id")?;
        let eos = special_id("tokenizer.ggml.eos_token_id")?;
        let unk = special_id("tokenizer.ggml.unknown_token_id")?;
        let pad = special_id("tokenizer.ggml.padding_token_id")?;
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            if vocab.insert(t.clone(), json!(i)).is_some() {
                return Err(err(format!(
                    "token '{t}' is listed twice in the vocabulary"
                )));
            }
            if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
                }));
            }
        }
        Ok(HfTokenizerFiles {
            tokenizer: bpe_json(added, pre_tokenizer, unk, vocab, json!(merges)),
            config: gpt2_config(
                kv.get("tokenizer.ggml.add_bos_token")
                    .is_some_and(|v| *v == GgufValue::Bool(true)),
                [bos, eos, unk, pad],
                g.config().context_length.unwrap_or(2048),
                kv.get("tokenizer.chat_template")
                    .and_then(GgufValue::as_str),
            ),
        })
    }

    /// A byte-level BPE without merges: `specials` (ids `0..specials.len()`,
    /// special added tokens), then the 256 bytes in GPT-2's byte-to-unicode
    /// alphabet, so any UTF-8 text encodes to one token per byte. `eos` (one
    /// of `specials`) is the end-of-sequence token; `chat_template`, when
    /// given, goes into `tokenizer_config.json`. For tiny random models in
    /// tests and toy studies: `transformers` and the `tokenizers` crate read it.
    pub fn byte_level(specials: &[&str], eos: &str, chat_template: Option<&str>) -> Result<Self> {
        let bad = |msg: String| WeightsError::InvalidHeader {
            path: "tokenizer.json".into(),
            msg,
        };
        if !specials.contains(&eos) {
            return Err(bad(format!(
                "eos token '{eos}' is not among the specials {specials:?}"
            )));
        }
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, t) in specials.iter().enumerate() {
            if vocab.insert(t.to_string(), json!(i)).is_some() {
                return Err(bad(format!("special token '{t}' is listed twice")));
            }
            added.push(json!({
                "id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            }));
        }
        for (b, ch) in gpt2_byte_alphabet().into_iter().enumerate() {
            if vocab
                .insert(ch.to_string(), json!(specials.len() + b))
                .is_some()
            {
                return Err(bad(format!("special token '{ch}' is also a byte token")));
            }
        }
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        Ok(HfTokenizerFiles {
            tokenizer: bpe_json(added, byte_level, None, vocab, json!([])),
            config: gpt2_config(false, [None, Some(eos), None, None], 2048, chat_template),
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`, atomically.
    pub fn save(&self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        let dir = dir.as_ref();
        let to_bytes = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialise");
        crate::atomic::write_atomic(dir.join("tokenizer.json"), &to_bytes(&self.tokenizer))?;
        crate::atomic::write_atomic(dir.join("tokenizer_config.json"), &to_bytes(&self.config))?;
        Ok(())
    }
}

/// `tokenizer.json` of a byte-level BPE (GPT-2's post-processor and decoder).
fn bpe_json(
    added: Vec<Value>,
    pre_tokenizer: Value,
    unk: Option<&str>,
    vocab: serde_json::Map<String, Value>,
    merges: Value,
) -> Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    })
}

/// `tokenizer_config.json` of a GPT-2-class tokenizer; `specials` are the
/// bos, eos, unk and pad tokens.
fn gpt2_config(
    add_bos_token: bool,
    [bos, eos, unk, pad]: [Option<&str>; 4],
    model_max_length: usize,
    chat_template: Option<&str>,
) -> Value {
    let mut config = json!({
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": false,
        "add_bos_token": add_bos_token,
        "clean_up_tokenization_spaces": false,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "model_max_length": model_max_length,
    });
    if let Some(t) = chat_template {
        config["chat_template"] = json!(t);
    }
    config
}

/// GPT-2's `bytes_to_unicode`: byte `b` as the printable character the
/// byte-level BPE uses for it (printable Latin-1 bytes map to themselves,
/// the others to U+0100 onwards in byte order).
pub fn gpt2_byte_alphabet() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            let c = char::from_u32(next).expect("below U+0200");
            next += 1;
            c
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_alphabet_matches_bytes_to_unicode() {
        let a = gpt2_byte_alphabet();
        // Values from GPT-2's encoder.py: space is 'Ġ' (U+0120), newline 'Ċ' (U+010A), 'A' itself.
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[0], 'Ā');
        assert_eq!(a[0xad], 'Ń');
        let distinct: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn byte_level_refuses_an_unknown_eos() {
        let e = HfTokenizerFiles::byte_level(&["<s>"], "</s>", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'</s>'"), "{e}");
        let f =
            HfTokenizerFiles::byte_level(&["<|endoftext|>", "<|im_end|>"], "<|im_end|>", Some("x"))
                .unwrap();
        assert_eq!(
            f.tokenizer["model"]["vocab"].as_object().unwrap().len(),
            258
        );
        assert_eq!(f.tokenizer["model"]["vocab"]["Ġ"], 2 + 32);
        assert_eq!(f.config["chat_template"], "x");
    }
}
