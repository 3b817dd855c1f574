//! Permutation specs of common architectures, built as data.

use weights::llama::names;
use weights::{LlamaConfig, StateDict};

use crate::error::{PermuteError, Result};
use crate::spec::{Group, Inner, Member, PermutationSpec};

/// The layer index of an MLP parameter stem: the trailing integer of
/// `layers.3`, `fc2`, `Dense_1`, `net.4`.
fn layer_index(stem: &str) -> Option<usize> {
    let digits: String = stem
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if digits.is_empty() {
        return None;
    }
    digits.parse().ok()
}

/// The name of the permutation group of an MLP's `k`-th hidden layer in
/// [`mlp`]'s spec (the outputs of layer `k`, the inputs of layer `k + 1`).
pub fn mlp_group(k: usize) -> String {
    format!("P_{k}")
}

/// The name of the FFN channel group of layer `l` in [`llama`]'s spec.
pub fn llama_ffn_group(l: usize) -> String {
    format!("{}.ffn", names::layer(l))
}

/// The name of the attention head group of layer `l` in [`llama`]'s spec.
pub fn llama_heads_group(l: usize) -> String {
    format!("{}.heads", names::layer(l))
}

/// The layer stems of an MLP in forward order (`layers.0`, `layers.1`, … or
/// `fc1`, `fc2`, …): the names [`mlp`] accepts, ordered by their index.
pub fn mlp_layers(sd: &StateDict) -> Result<Vec<String>> {
    let mut layers: Vec<(usize, String)> = Vec::new();
    for (name, t) in sd.iter() {
        if let Some(stem) = name.strip_suffix(".weight")
            && t.shape().len() == 2
        {
            let idx = layer_index(stem).ok_or_else(|| {
                PermuteError::InvalidSpec(format!("MLP weight '{name}' has no layer index (expected e.g. layers.0.weight, fc1.weight)"))
            })?;
            layers.push((idx, stem.to_string()));
        }
    }
    layers.sort();
    if layers.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(PermuteError::InvalidSpec(
            "two MLP layers share one index".into(),
        ));
    }
    if layers.len() < 2 {
        return Err(PermuteError::InvalidSpec(format!(
            "an MLP needs at least 2 layers, found {}",
            layers.len()
        )));
    }
    Ok(layers.into_iter().map(|(_, stem)| stem).collect())
}

/// The spec of a multilayer perceptron, inferred from parameter names.
///
/// Accepted names: `<stem>.weight` (2-D, `[out, in]`) with an optional
/// `<stem>.bias`, where the stem ends in the layer's integer index —
/// `layers.0`, `layers.1`, … (PyTorch `nn.Sequential` style), `fc1`, `fc2`, …,
/// `Dense_0`, `Dense_1`, … (Flax naming, with `[out, in]` weights). Layers are
/// ordered by that index; consecutive layers must chain
/// (`out` of one = `in` of the next). Hidden group `P_i` permutes the rows of
/// layer `i`'s weight and bias and the columns of layer `i+1`'s weight; the
/// last layer's outputs stay fixed.
pub fn mlp(sd: &StateDict) -> Result<PermutationSpec> {
    let layers = mlp_layers(sd)?;
    let mut groups = Vec::new();
    for (k, w) in layers.windows(2).enumerate() {
        let (cur, next) = (&w[0], &w[1]);
        let out = sd.get(&format!("{cur}.weight")).expect("listed").shape()[0];
        let next_in = sd.get(&format!("{next}.weight")).expect("listed").shape()[1];
        if out != next_in {
            return Err(PermuteError::InvalidSpec(format!(
                "{cur}.weight has {out} outputs but {next}.weight takes {next_in} inputs"
            )));
        }
        let (wc, bc, wn) = (
            format!("{cur}.weight"),
            format!("{cur}.bias"),
            format!("{next}.weight"),
        );
        let mut members = vec![(wc.as_str(), 0usize)];
        if sd.contains(&bc) {
            members.push((bc.as_str(), 0));
        }
        members.push((wn.as_str(), 1));
        groups.push(Group::units(mlp_group(k), out, &members));
    }
    Ok(PermutationSpec { groups })
}

fn push_if(sd: Option<&StateDict>, members: &mut Vec<(String, usize)>, name: String, axis: usize) {
    if sd.is_none_or(|sd| sd.contains(&name)) {
        members.push((name, axis));
    }
}

fn group_of(name: String, n: usize, members: &[(String, usize)]) -> Group {
    let refs: Vec<(&str, usize)> = members.iter().map(|(w, a)| (w.as_str(), *a)).collect();
    Group::units(name, n, &refs)
}

/// The spec of a Hugging Face LLaMA checkpoint (`model.layers.N.*`).
///
/// Groups: `residual` (embeddings, every RMSNorm, q/k/v/gate/up inputs,
/// o/down outputs, final norm, `lm_head` inputs); `layers.N.ffn` (gate/up
/// rows, down columns); `layers.N.heads`, which moves whole key/value heads
/// together with their query heads (GQA: query head `h` uses key/value head
/// `h / (heads/kv_heads)`), with a q/k family that stays fixed inside a head
/// (rotary pairs carry their frequency: moving one changes the function), a
/// free v/o family (v rows and the matching o columns of every query head of
/// that key/value head), and free copies: the query heads sharing a key/value
/// head may be reordered among themselves (their q rows with their o columns),
/// which grouped-query attention cannot tell apart. Optional q/k/v biases and an untied `lm_head` are
/// included when `sd` has them.
pub fn llama(c: &LlamaConfig, sd: &StateDict) -> Result<PermutationSpec> {
    c.check()
        .map_err(|e| PermuteError::InvalidSpec(e.to_string()))?;
    let mut residual: Vec<(String, usize)> = Vec::new();
    push_if(None, &mut residual, names::EMBED.into(), 1);
    let mut groups = Vec::new();
    let n_rep = c.num_attention_heads / c.num_key_value_heads;
    for l in 0..c.num_hidden_layers {
        let w = |part: &str| names::weight(l, part);
        for n in [names::INPUT_NORM, names::POST_ATTENTION_NORM] {
            residual.push((w(n), 0));
        }
        for n in [names::Q_PROJ, names::K_PROJ, names::V_PROJ] {
            residual.push((w(n), 1));
        }
        residual.push((w(names::O_PROJ), 0));
        for n in [names::GATE_PROJ, names::UP_PROJ] {
            residual.push((w(n), 1));
        }
        residual.push((w(names::DOWN_PROJ), 0));
        let ffn = [
            (w(names::GATE_PROJ), 0),
            (w(names::UP_PROJ), 0),
            (w(names::DOWN_PROJ), 1),
        ];
        groups.push(group_of(llama_ffn_group(l), c.intermediate_size, &ffn));
        let mut heads = Vec::new();
        let member = |w: String, axis, repeat, family| Member {
            weight: w,
            axis,
            repeat,
            family,
        };
        for (proj, repeat, family) in [
            (names::Q_PROJ, n_rep, 0usize),
            (names::K_PROJ, 1, 0),
            (names::V_PROJ, 1, 1),
        ] {
            heads.push(member(w(proj), 0, repeat, family));
            let bias = names::bias(l, proj);
            if sd.contains(&bias) {
                heads.push(member(bias, 0, repeat, family));
            }
        }
        heads.push(member(w(names::O_PROJ), 1, n_rep, 1));
        groups.push(Group {
            name: llama_heads_group(l),
            blocks: c.num_key_value_heads,
            block_size: c.head_dim,
            families: vec![Inner::Identity, Inner::Free],
            copies: if n_rep > 1 {
                Inner::Free
            } else {
                Inner::Identity
            },
            members: heads,
        });
    }
    residual.push((names::NORM.into(), 0));
    push_if(Some(sd), &mut residual, names::LM_HEAD.into(), 1);
    let mut all = vec![group_of("residual".into(), c.hidden_size, &residual)];
    all.extend(groups);
    Ok(PermutationSpec { groups: all })
}

/// Git Re-Basin's unit-wise spec of a multi-head (not grouped-query) LLaMA
/// checkpoint: [`llama`]'s residual and FFN groups, and per block two plain
/// unit groups in place of its head group — `layers.N.qk` (q and k rows,
/// with their biases) and `layers.N.vo` (v rows with bias, o columns) of
/// `heads·head_dim` units each, free to move across heads and to split
/// rotary pairs.
///
/// **Not a symmetry**: a unit moved to another head changes that head's
/// attention scores, and a rotary dimension moved to another frequency
/// changes its rotation, so applying it changes the function. It is the
/// ablation the head-aware spec is measured against. Grouped-query
/// checkpoints are refused: q and k rows have different counts there.
pub fn llama_units(c: &LlamaConfig, sd: &StateDict) -> Result<PermutationSpec> {
    if c.num_key_value_heads != c.num_attention_heads {
        return Err(PermuteError::InvalidSpec(format!(
            "the unit-wise LLaMA spec needs multi-head attention; this config has {} query and {} key/value heads",
            c.num_attention_heads, c.num_key_value_heads
        )));
    }
    let mut spec = llama(c, sd)?;
    let units = c.num_attention_heads * c.head_dim;
    let mut groups = Vec::with_capacity(spec.groups.len() + c.num_hidden_layers);
    for g in spec.groups.drain(..) {
        let Some(p) = g.name.strip_suffix(".heads") else {
            groups.push(g);
            continue;
        };
        // Family 0 of the head group is q/k, family 1 is v/o.
        for (suffix, family) in [("qk", 0), ("vo", 1)] {
            let members: Vec<(String, usize)> = g
                .members
                .iter()
                .filter(|m| m.family == family)
                .map(|m| (m.weight.clone(), m.axis))
                .collect();
            groups.push(group_of(format!("{p}.{suffix}"), units, &members));
        }
    }
    Ok(PermutationSpec { groups })
}

/// The spec of a Hugging Face BERT encoder (`[bert.]embeddings.*`,
/// `[bert.]encoder.layer.N.*`, optional pooler), from the checkpoint itself
/// (`heads` is needed: shapes do not tell it).
///
/// Groups: `residual` (all embeddings' columns, every LayerNorm, attention
/// and FFN inputs and outputs, pooler input); `layer.N.ffn`; `layer.N.heads`
/// (whole heads, with free within-head permutations for q/k together and for
/// v/o together: BERT has no rotary embedding).
pub fn bert(sd: &StateDict, heads: usize) -> Result<PermutationSpec> {
    let prefix = if sd.contains("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    };
    let word = format!("{prefix}embeddings.word_embeddings.weight");
    let hidden = sd
        .get(&word)
        .ok_or_else(|| PermuteError::InvalidSpec(format!("no '{word}': not a BERT checkpoint")))?
        .shape()[1];
    if heads == 0 || hidden % heads != 0 {
        return Err(PermuteError::InvalidSpec(format!(
            "hidden size {hidden} is not divisible into {heads} heads"
        )));
    }
    let d = hidden / heads;
    let mut residual: Vec<(String, usize)> = Vec::new();
    for e in [
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
    ] {
        push_if(
            Some(sd),
            &mut residual,
            format!("{prefix}embeddings.{e}.weight"),
            1,
        );
    }
    for n in ["weight", "bias"] {
        push_if(
            Some(sd),
            &mut residual,
            format!("{prefix}embeddings.LayerNorm.{n}"),
            0,
        );
    }
    let mut groups = Vec::new();
    let mut l = 0;
    while sd.contains(&format!(
        "{prefix}encoder.layer.{l}.attention.self.query.weight"
    )) {
        let p = format!("{prefix}encoder.layer.{l}");
        for n in ["query", "key", "value"] {
            residual.push((format!("{p}.attention.self.{n}.weight"), 1));
        }
        for n in [
            "attention.output.dense.weight",
            "attention.output.dense.bias",
            "output.dense.weight",
            "output.dense.bias",
        ] {
            push_if(Some(sd), &mut residual, format!("{p}.{n}"), 0);
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            for n in ["weight", "bias"] {
                push_if(Some(sd), &mut residual, format!("{p}.{ln}.{n}"), 0);
            }
        }
        residual.push((format!("{p}.intermediate.dense.weight"), 1));
        let ffn_size = sd
            .get(&format!("{p}.intermediate.dense.weight"))
            .map(|t| t.shape()[0])
            .unwrap_or(0);
        let mut ffn = vec![(format!("{p}.intermediate.dense.weight"), 0)];
        push_if(
            Some(sd),
            &mut ffn,
            format!("{p}.intermediate.dense.bias"),
            0,
        );
        ffn.push((format!("{p}.output.dense.weight"), 1));
        groups.push(group_of(format!("layer.{l}.ffn"), ffn_size, &ffn));
        let mut hm = Vec::new();
        for (n, family) in [("query", 0usize), ("key", 0), ("value", 1)] {
            for part in ["weight", "bias"] {
                let w = format!("{p}.attention.self.{n}.{part}");
                if sd.contains(&w) {
                    hm.push(Member {
                        weight: w,
                        axis: 0,
                        repeat: 1,
                        family,
                    });
                }
            }
        }
        hm.push(Member {
            weight: format!("{p}.attention.output.dense.weight"),
            axis: 1,
            repeat: 1,
            family: 1,
        });
        groups.push(Group {
            name: format!("layer.{l}.heads"),
            blocks: heads,
            block_size: d,
            families: vec![Inner::Free, Inner::Free],
            copies: Inner::Identity,
            members: hm,
        });
        l += 1;
    }
    push_if(
        Some(sd),
        &mut residual,
        format!("{prefix}pooler.dense.weight"),
        1,
    );
    let mut all = vec![group_of("residual".into(), hidden, &residual)];
    all.extend(groups);
    Ok(PermutationSpec { groups: all })
}

/// A normalisation layer's per-channel tensors (BatchNorm and LayerNorm names).
const NORM_PARAMS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

fn norm_members(sd: &StateDict, prefix: &str, out: &mut Vec<(String, usize)>) {
    for p in NORM_PARAMS {
        push_if(Some(sd), out, format!("{prefix}.{p}"), 0);
    }
}

/// The spec of a torchvision-style ResNet (`conv1`, `bn1`,
/// `layerS.B.convK`, `layerS.B.bnK`, `layerS.B.downsample.{0,1}`, `fc`),
/// basic or bottleneck blocks.
///
/// Residual streams: the stem's output is the stream of stage 1; a block with
/// a `downsample` shortcut starts a new stream (its last conv, last norm and
/// shortcut conv/norm produce it, its first conv and shortcut conv read the old
/// one); all blocks of a stage share their stage's stream. Inside a block,
/// `convK` → `bnK` → `conv(K+1)` is a free channel group. `fc` reads the last
/// stream. BatchNorm running statistics move with their channels.
pub fn resnet(sd: &StateDict) -> Result<PermutationSpec> {
    if !sd.contains("conv1.weight") {
        return Err(PermuteError::InvalidSpec(
            "no 'conv1.weight': not a torchvision-style ResNet".into(),
        ));
    }
    let channels = |name: &str| sd.get(name).map(|t| t.shape()[0]);
    let mut streams: Vec<(usize, Vec<(String, usize)>)> = Vec::new();
    let mut stem = vec![("conv1.weight".to_string(), 0usize)];
    norm_members(sd, "bn1", &mut stem);
    streams.push((channels("conv1.weight").expect("checked"), stem));
    let mut groups = Vec::new();
    let mut blocks: Vec<(usize, usize)> = sd
        .keys()
        .filter_map(|k| {
            let rest = k.strip_prefix("layer")?;
            let mut it = rest.split('.');
            let s: usize = it.next()?.parse().ok()?;
            let b: usize = it.next()?.parse().ok()?;
            Some((s, b))
        })
        .collect();
    blocks.sort();
    blocks.dedup();
    for (s, b) in blocks {
        let p = format!("layer{s}.{b}");
        let convs: Vec<usize> = (1..=3)
            .take_while(|k| sd.contains(&format!("{p}.conv{k}.weight")))
            .collect();
        if convs.is_empty() {
            return Err(PermuteError::InvalidSpec(format!(
                "block {p} has no conv1.weight"
            )));
        }
        let last = *convs.last().expect("non-empty");
        let input = streams.len() - 1;
        streams[input].1.push((format!("{p}.conv1.weight"), 1));
        let has_down = sd.contains(&format!("{p}.downsample.0.weight"));
        let output = if has_down {
            streams[input]
                .1
                .push((format!("{p}.downsample.0.weight"), 1));
            let mut m = vec![(format!("{p}.downsample.0.weight"), 0)];
            norm_members(sd, &format!("{p}.downsample.1"), &mut m);
            streams.push((
                channels(&format!("{p}.downsample.0.weight")).expect("present"),
                m,
            ));
            streams.len() - 1
        } else {
            input
        };
        streams[output]
            .1
            .push((format!("{p}.conv{last}.weight"), 0));
        let mut bn_last = Vec::new();
        norm_members(sd, &format!("{p}.bn{last}"), &mut bn_last);
        streams[output].1.extend(bn_last);
        for k in convs.iter().copied().filter(|&k| k < last) {
            let mut m = vec![(format!("{p}.conv{k}.weight"), 0)];
            norm_members(sd, &format!("{p}.bn{k}"), &mut m);
            m.push((format!("{p}.conv{}.weight", k + 1), 1));
            let n = channels(&format!("{p}.conv{k}.weight")).expect("present");
            groups.push(group_of(format!("{p}.inner{k}"), n, &m));
        }
    }
    let last = streams.len() - 1;
    push_if(Some(sd), &mut streams[last].1, "fc.weight".into(), 1);
    let mut all: Vec<Group> = streams
        .iter()
        .enumerate()
        .map(|(i, (n, m))| group_of(format!("stream{i}"), *n, m))
        .collect();
    all.extend(groups);
    Ok(PermutationSpec { groups: all })
}

/// Which builder fits a checkpoint, from its tensor names.
pub fn infer_arch(sd: &StateDict) -> Option<&'static str> {
    if sd.contains(names::EMBED) {
        Some("llama")
    } else if sd
        .keys()
        .any(|k| k.ends_with("embeddings.word_embeddings.weight"))
    {
        Some("bert")
    } else if sd.contains("conv1.weight") && sd.keys().any(|k| k.starts_with("layer1.")) {
        Some("resnet")
    } else if sd.keys().any(|k| k.starts_with("features."))
        && sd.keys().any(|k| k.starts_with("classifier."))
    {
        Some("vgg")
    } else if mlp(sd).is_ok() {
        Some("mlp")
    } else {
        None
    }
}

/// What a checkpoint's tensor names cannot tell [`infer_spec`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SpecHints<'a> {
    /// The architecture (`mlp`, `vgg`, `resnet`, `llama`, `bert`); `None`: [`infer_arch`].
    pub arch: Option<&'a str>,
    /// The model's Hugging Face `config.json` text, if any.
    pub config_json: Option<&'a str>,
    /// Attention heads (over the config's).
    pub heads: Option<usize>,
    /// Key/value heads of a LLaMA model (over the config's; default: `heads`).
    pub kv_heads: Option<usize>,
}

/// The permutation spec of checkpoint `sd` and the architecture it was
/// built for: the architecture from `hints.arch` or the tensor names
/// ([`infer_arch`]); head counts from the hints, else `config.json`; a
/// LLaMA's other sizes from `config.json`, else the tensors' shapes (one key/value
/// head per query head unless `kv_heads` says otherwise).
pub fn infer_spec(sd: &StateDict, hints: &SpecHints<'_>) -> Result<(String, PermutationSpec)> {
    let invalid = |m: String| PermuteError::InvalidSpec(m);
    let arch = match hints.arch {
        Some(a) => a.to_string(),
        None => infer_arch(sd)
            .ok_or_else(|| invalid("cannot infer the architecture from the tensor names".into()))?
            .to_string(),
    };
    let config = hints
        .config_json
        .map(|c| {
            serde_json::from_str::<serde_json::Value>(c)
                .map_err(|e| invalid(format!("config.json: {e}")))
        })
        .transpose()?;
    let spec = match arch.as_str() {
        "mlp" => mlp(sd)?,
        "resnet" => resnet(sd)?,
        "vgg" => vgg(sd)?,
        "bert" => {
            let heads = hints
                .heads
                .or_else(|| {
                    let h = config.as_ref()?.get("num_attention_heads")?.as_u64()?;
                    Some(h as usize)
                })
                .ok_or_else(|| {
                    invalid("bert needs its head count (config.json's num_attention_heads)".into())
                })?;
            bert(sd, heads)?
        }
        "llama" => {
            let to_invalid = |e: weights::WeightsError| invalid(e.to_string());
            let mut c = match &config {
                Some(v) => LlamaConfig::from_hf(v).map_err(to_invalid)?,
                None => {
                    let h = hints.heads.ok_or_else(|| {
                        invalid("llama needs its head count (or a config.json)".into())
                    })?;
                    LlamaConfig::from_state_dict(sd, h).map_err(to_invalid)?
                }
            };
            if let Some(h) = hints.heads {
                c.num_attention_heads = h;
            }
            if let Some(k) = hints.kv_heads {
                c.num_key_value_heads = k;
            }
            llama(&c, sd)?
        }
        other => {
            return Err(invalid(format!(
                "unknown architecture '{other}' (mlp, vgg, resnet, llama, bert)"
            )));
        }
    };
    Ok((arch, spec))
}

/// The spec of a VGG-style CNN in torchvision naming: `features.N` holding
/// convolutions (4-D weights) each optionally followed by a normalisation
/// layer (1-D `weight`/`bias`/`running_mean`/`running_var`), then
/// `classifier.N` linear layers.
///
/// Each convolution's output channels form a group with its normalisation
/// layer and the next convolution's input channels. The last convolution's
/// channels reach the first classifier layer through a flatten of `C × H × W`
/// values, so there the group moves blocks of `H·W` consecutive columns
/// (`repeat = H·W` on that member). Classifier layers chain like an MLP; the
/// last one's outputs stay fixed.
pub fn vgg(sd: &StateDict) -> Result<PermutationSpec> {
    let indexed = |prefix: &str| -> Vec<usize> {
        let mut v: Vec<usize> = sd
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let feats = indexed("features.");
    let convs: Vec<usize> = feats
        .iter()
        .copied()
        .filter(|i| {
            sd.get(&format!("features.{i}.weight"))
                .is_some_and(|t| t.shape().len() == 4)
        })
        .collect();
    let linears: Vec<usize> = indexed("classifier.")
        .into_iter()
        .filter(|i| {
            sd.get(&format!("classifier.{i}.weight"))
                .is_some_and(|t| t.shape().len() == 2)
        })
        .collect();
    if convs.is_empty() || linears.is_empty() {
        return Err(PermuteError::InvalidSpec(
            "a VGG needs features.N convolutions and classifier.N linears".into(),
        ));
    }
    let mut groups = Vec::new();
    for (k, &c) in convs.iter().enumerate() {
        let w = format!("features.{c}.weight");
        let n = sd.get(&w).expect("listed").shape()[0];
        let mut members = vec![(w, 0usize, 1usize)];
        let mut add = |name: String, axis: usize, repeat: usize| {
            if sd.contains(&name) {
                members.push((name, axis, repeat));
            }
        };
        add(format!("features.{c}.bias"), 0, 1);
        // A 1-D layer right after the conv (before the next conv) is its normalisation.
        let next_conv = convs.get(k + 1).copied().unwrap_or(usize::MAX);
        for &i in feats.iter().filter(|&&i| i > c && i < next_conv) {
            if sd
                .get(&format!("features.{i}.weight"))
                .is_some_and(|t| t.shape().len() == 1)
            {
                for p in NORM_PARAMS {
                    add(format!("features.{i}.{p}"), 0, 1);
                }
            }
        }
        match convs.get(k + 1) {
            Some(nc) => add(format!("features.{nc}.weight"), 1, 1),
            None => {
                let first = format!("classifier.{}.weight", linears[0]);
                let cols = sd.get(&first).expect("listed").shape()[1];
                if !cols.is_multiple_of(n) {
                    return Err(PermuteError::InvalidSpec(format!(
                        "{first} has {cols} inputs, not a multiple of {n} channels"
                    )));
                }
                add(first, 1, cols / n);
            }
        }
        groups.push(Group {
            name: format!("features.{c}"),
            blocks: n,
            block_size: 1,
            families: vec![Inner::Identity],
            copies: Inner::Identity,
            members: members
                .into_iter()
                .map(|(weight, axis, repeat)| Member {
                    weight,
                    axis,
                    repeat,
                    family: 0,
                })
                .collect(),
        });
    }
    for w in linears.windows(2) {
        let (cur, next) = (
            format!("classifier.{}", w[0]),
            format!("classifier.{}", w[1]),
        );
        let n = sd.get(&format!("{cur}.weight")).expect("listed").shape()[0];
        let mut m = vec![(format!("{cur}.weight"), 0)];
        push_if(Some(sd), &mut m, format!("{cur}.bias"), 0);
        m.push((format!("{next}.weight"), 1));
        groups.push(group_of(cur, n, &m));
    }
    Ok(PermutationSpec { groups })
}
