//! A minimal byte-level BPE tokenizer (GPT-2 family) built from a GGUF
//! file's `tokenizer.ggml.tokens` / `tokenizer.ggml.merges`, enough to encode
//! prompts and decode predictions for LLaMA-family checkpoints such as
//! SmolLM2 (`tokenizer.ggml.model = "gpt2"`). We chose this over the
//! `tokenizers` crate: the vocabulary and merges already live in the GGUF,
//! and ~150 lines avoid a large dependency (with its regex engine) in the
//! crate that already compiles Burn.
//!
//! Pre-tokenization follows the GPT-2 pattern without regex:
//! contractions (`'s 't 're 've 'm 'll 'd`), an optional space followed by a
//! run of letters, single digits (SmolLM's `\p{N}` rule), an optional space
//! followed by a run of other symbols, and whitespace runs that leave their
//! last space to the next word. Scripts whose words are not separated by
//! spaces, and special-token parsing, are out of scope.

use std::collections::HashMap;

use crate::error::{Result, S2ftError};

/// The tokenizer.
pub struct BpeTokenizer {
    vocab: HashMap<String, u32>,
    tokens: Vec<String>,
    ranks: HashMap<(String, String), usize>,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
}

/// GPT-2's reversible byte → printable character map.
fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32).collect();
    printable.extend('¡' as u32..='¬' as u32);
    printable.extend('®' as u32..='ÿ' as u32);
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        map[b as usize] = if printable.contains(&b) {
            char::from_u32(b).expect("latin-1")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("BMP")
        };
    }
    map
}

impl BpeTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(g: &weights::GgufFile) -> Result<Self> {
        let kv = g.kv();
        let err = |m: &str| S2ftError::Config(format!("GGUF tokenizer: {m}"));
        if let Some(model) = kv.get("tokenizer.ggml.model").and_then(|v| v.as_str())
            && model != "gpt2"
        {
            return Err(err(&format!(
                "model '{model}' is not byte-level BPE ('gpt2')"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            kv.get(key)
                .and_then(|v| v.as_array())
                .ok_or_else(|| err(&format!("'{key}' is missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| err(&format!("'{key}' holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        Self::new(tokens, &merges)
    }

    /// From a vocabulary (id order) and merges (`"a b"`, by priority).
    pub fn new(tokens: Vec<String>, merges: &[String]) -> Result<Self> {
        let vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut ranks = HashMap::new();
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                S2ftError::Config(format!("GGUF tokenizer: merge {i} '{m}' has no space"))
            })?;
            ranks.entry((a.to_string(), b.to_string())).or_insert(i);
        }
        let byte_char = bytes_to_unicode();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Ok(BpeTokenizer {
            vocab,
            tokens,
            ranks,
            byte_char,
            char_byte,
        })
    }

    /// Splits text into pre-tokens (see the module docs).
    pub fn pre_tokenize(text: &str) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        let is_other = |c: char| !c.is_whitespace() && !c.is_alphabetic() && !c.is_numeric();
        while i < chars.len() {
            let c = chars[i];
            let start = i;
            if c == '\'' {
                let rest: String = chars[i + 1..chars.len().min(i + 3)]
                    .iter()
                    .collect::<String>()
                    .to_lowercase();
                if let Some(suffix) = ["s", "t", "re", "ve", "m", "ll", "d"]
                    .iter()
                    .find(|s| rest.starts_with(**s))
                {
                    // Longest match first for the two-letter forms.
                    let len = if rest.starts_with("re")
                        || rest.starts_with("ve")
                        || rest.starts_with("ll")
                    {
                        2
                    } else {
                        suffix.len()
                    };
                    i += 1 + len;
                    out.push(chars[start..i].iter().collect());
                    continue;
                }
            }
            // Digits are split out first (SmolLM's `\p{N}` rule), so a space before one stands alone.
            let lead = usize::from(
                c == ' '
                    && i + 1 < chars.len()
                    && !chars[i + 1].is_whitespace()
                    && !chars[i + 1].is_numeric(),
            );
            let first = chars.get(i + lead).copied().unwrap_or(c);
            if first.is_alphabetic() {
                i += lead;
                while i < chars.len() && chars[i].is_alphabetic() {
                    i += 1;
                }
            } else if first.is_numeric() {
                i += 1;
            } else if is_other(first) {
                i += lead;
                while i < chars.len() && is_other(chars[i]) {
                    i += 1;
                }
            } else {
                // Whitespace run; leave its last space to the next word.
                while i < chars.len() && chars[i].is_whitespace() {
                    i += 1;
                }
                if i < chars.len() && i - start > 1 && chars[i - 1] == ' ' {
                    i -= 1;
                }
            }
            out.push(chars[start..i].iter().collect());
        }
        out
    }

    fn bpe(&self, word: &str) -> Vec<String> {
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts.splice(i..i + 2, [merged]);
        }
        parts
    }

    /// Token ids of `text`. Errors name a piece the vocabulary lacks.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in Self::pre_tokenize(text) {
            let mapped: String = piece.bytes().map(|b| self.byte_char[b as usize]).collect();
            for sym in self.bpe(&mapped) {
                let id = self
                    .vocab
                    .get(&sym)
                    .ok_or_else(|| S2ftError::Config(format!("tokenizer: no token for '{sym}'")))?;
                ids.push(*id);
            }
        }
        Ok(ids)
    }

    /// The text of `ids` (bytes outside the map are dropped; invalid UTF-8 is replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter_map(|&i| self.tokens.get(i as usize))
            .flat_map(|t| {
                t.chars()
                    .filter_map(|c| self.char_byte.get(&c).copied())
                    .collect::<Vec<_>>()
            })
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenization_follows_the_gpt2_pattern() {
        assert_eq!(
            BpeTokenizer::pre_tokenize("The cat's 42 hats!!  ok"),
            vec![
                "The", " cat", "'s", " ", "4", "2", " hats", "!!", " ", " ok"
            ]
        );
    }

    #[test]
    fn bpe_applies_merges_by_rank_and_round_trips() {
        let tokens: Vec<String> = [
            "h", "e", "l", "o", "Ġ", "he", "ll", "hell", "hello", "Ġw", "w", "r", "d", "Ġwo", "o",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let merges: Vec<String> = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let t = BpeTokenizer::new(tokens, &merges).unwrap();
        let ids = t.encode("hello world").unwrap();
        let pieces: Vec<&str> = ids.iter().map(|&i| t.tokens[i as usize].as_str()).collect();
        assert_eq!(pieces, vec!["hello", "Ġwo", "r", "l", "d"]);
        assert_eq!(t.decode(&ids), "hello world");
        assert!(t.encode("zebra").is_err());
    }
}
