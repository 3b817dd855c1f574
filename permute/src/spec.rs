//! Permutation specs as data, and applying them.
//!
//! A [`PermutationSpec`] lists permutation groups. Each [`Group`] permutes
//! `blocks` blocks of `block_size` units (a plain group of `n` hidden units is
//! `n` blocks of size 1) and names every `(weight, axis)` it acts on. An axis
//! a group acts on has length `blocks · repeat · block_size`, laid out as
//! `[block][copy][unit]`: `repeat` copies of a block's units sit side by side
//! (the query heads that share one key/value head in grouped-query attention).
//! Besides moving whole blocks (`outer`), a group may permute the units inside
//! each block: one independent inner permutation per block for each *family*
//! ([`Inner::Free`]), or none ([`Inner::Identity`]); each member says which
//! family applies to it. A group may also permute the `repeat` copies inside
//! each block (`copies`: one permutation per block, shared by every member
//! with more than one copy; members with one copy are unaffected). This
//! covers in one mechanism:
//!
//! - MLP/CNN hidden units and channels (`blocks = n`, `block_size = 1`);
//! - attention heads: `blocks` = key/value heads, `block_size` = head dim,
//!   q/o members with `repeat` = query heads per key/value head, a q/k family
//!   ([`Inner::Identity`] under RoPE: moving a rotary pair to another position
//!   changes its frequency and the function, so only whole heads move; free
//!   without RoPE) and a v/o family ([`Inner::Free`]);
//! - the query heads that share a key/value head, which may be reordered among
//!   themselves (q rows and o columns of whole query heads, `copies` free).
//!
//! A [`GroupPerm`] maps new positions to old ones (Git Re-Basin's convention):
//! the permuted model's block `j` is the original block `outer[j]`, its copy
//! `r` is the original copy `copies[j][r]` of that block, and its unit `i`
//! inside the block is the original unit `inner[f][j][i]`.

use std::collections::HashMap;

use indexmap::IndexMap;
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use weights::{StateDict, Tensor};

use crate::error::{PermuteError, Result};

/// Whether units (or copies) inside a block may be permuted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Inner {
    /// Units keep their order inside a block.
    #[default]
    Identity,
    /// Each block gets its own permutation of its units.
    Free,
}

/// One `(weight, axis)` a group acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The state-dict name of the weight.
    pub weight: String,
    /// The axis of that weight the group permutes (0 for a linear layer's
    /// outputs, 1 for its inputs).
    pub axis: usize,
    /// Copies of each block side by side on this axis.
    pub repeat: usize,
    /// Which inner-permutation family applies.
    pub family: usize,
}

/// A permutation group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// The group's name, unique in its spec; a [`Permutation`] holds the
    /// group's value under this name.
    pub name: String,
    /// The number of blocks the outer permutation reorders (hidden units, or
    /// key/value heads).
    pub blocks: usize,
    /// The units per block (1 for plain units, the head dimension for
    /// attention heads).
    pub block_size: usize,
    /// One entry per inner-permutation family: whether it permutes the units
    /// inside each block ([`Member::family`] indexes this).
    pub families: Vec<Inner>,
    /// Whether the copies of a block (members with `repeat > 1`, which must
    /// then all have the same `repeat`) may be reordered inside the block.
    #[serde(default)]
    pub copies: Inner,
    /// Every `(weight, axis)` the group acts on; permuting them all together
    /// leaves the network's function unchanged.
    pub members: Vec<Member>,
}

impl Group {
    /// A plain group of `n` units with the given `(weight, axis)` members.
    pub fn units(name: impl Into<String>, n: usize, members: &[(&str, usize)]) -> Group {
        Group {
            name: name.into(),
            blocks: n,
            block_size: 1,
            families: vec![Inner::Identity],
            copies: Inner::Identity,
            members: members
                .iter()
                .map(|(w, a)| Member {
                    weight: w.to_string(),
                    axis: *a,
                    repeat: 1,
                    family: 0,
                })
                .collect(),
        }
    }

    /// The axis length of a member.
    pub fn axis_len(&self, m: &Member) -> usize {
        self.blocks * m.repeat * self.block_size
    }

    /// The number of copies per block that `copies` permutes (1 when the
    /// copies are fixed or no member repeats).
    pub fn copy_count(&self) -> usize {
        match self.copies {
            Inner::Identity => 1,
            Inner::Free => self.members.iter().map(|m| m.repeat).max().unwrap_or(1),
        }
    }
}

/// The permutation groups of an architecture.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PermutationSpec {
    /// The groups, each permuting its own axes independently of the others.
    pub groups: Vec<Group>,
}

/// A value of one group: block order and, per family, per-block unit orders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPerm {
    /// `outer[j]`: the original block that new block `j` takes.
    pub outer: Vec<usize>,
    /// `inner[f][j]`: unit order inside new block `j` for family `f` (empty for identity families).
    pub inner: Vec<Vec<Vec<usize>>>,
    /// `copies[j]`: copy order inside new block `j` (empty when the group's copies are fixed).
    #[serde(default)]
    pub copies: Vec<Vec<usize>>,
}

/// A value for every group, by group name.
pub type Permutation = IndexMap<String, GroupPerm>;

fn inverse(p: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; p.len()];
    for (i, &j) in p.iter().enumerate() {
        inv[j] = i;
    }
    inv
}

fn check_bijection(p: &[usize], n: usize, group: &str, what: &str) -> Result<()> {
    let mut seen = vec![false; n];
    if p.len() != n
        || p.iter()
            .any(|&j| j >= n || std::mem::replace(&mut seen[j], true))
    {
        return Err(PermuteError::BadPermutation {
            group: group.to_string(),
            msg: format!("{what} is not a permutation of 0..{n}"),
        });
    }
    Ok(())
}

impl GroupPerm {
    /// The identity of a group.
    pub fn identity(g: &Group) -> GroupPerm {
        GroupPerm {
            outer: (0..g.blocks).collect(),
            inner: g
                .families
                .iter()
                .map(|f| match f {
                    Inner::Identity => vec![],
                    Inner::Free => vec![(0..g.block_size).collect(); g.blocks],
                })
                .collect(),
            copies: match g.copies {
                Inner::Identity => vec![],
                Inner::Free => vec![(0..g.copy_count()).collect(); g.blocks],
            },
        }
    }

    /// Checks the value fits its group.
    pub fn check(&self, g: &Group) -> Result<()> {
        check_bijection(&self.outer, g.blocks, &g.name, "outer")?;
        if self.inner.len() != g.families.len() {
            return Err(PermuteError::BadPermutation {
                group: g.name.clone(),
                msg: format!(
                    "{} inner families, group has {}",
                    self.inner.len(),
                    g.families.len()
                ),
            });
        }
        for (f, kind) in g.families.iter().enumerate() {
            match kind {
                Inner::Identity if !self.inner[f].is_empty() => {
                    return Err(PermuteError::BadPermutation {
                        group: g.name.clone(),
                        msg: format!("family {f} is fixed but has inner permutations"),
                    });
                }
                Inner::Free => {
                    if self.inner[f].len() != g.blocks {
                        return Err(PermuteError::BadPermutation {
                            group: g.name.clone(),
                            msg: format!("family {f} needs {} inner permutations", g.blocks),
                        });
                    }
                    for p in &self.inner[f] {
                        check_bijection(p, g.block_size, &g.name, "inner")?;
                    }
                }
                Inner::Identity => {}
            }
        }
        match g.copies {
            Inner::Identity if !self.copies.is_empty() => {
                return Err(PermuteError::BadPermutation {
                    group: g.name.clone(),
                    msg: "copies are fixed but a copy order is given".into(),
                });
            }
            Inner::Free => {
                if self.copies.len() != g.blocks {
                    return Err(PermuteError::BadPermutation {
                        group: g.name.clone(),
                        msg: format!(
                            "{} copy orders, group has {} blocks",
                            self.copies.len(),
                            g.blocks
                        ),
                    });
                }
                for p in &self.copies {
                    check_bijection(p, g.copy_count(), &g.name, "copy order")?;
                }
            }
            Inner::Identity => {}
        }
        Ok(())
    }

    /// The inverse value.
    pub fn inverse(&self) -> GroupPerm {
        let outer = inverse(&self.outer);
        let inner = self
            .inner
            .iter()
            .map(|fam| {
                if fam.is_empty() {
                    return vec![];
                }
                // New block k = outer[j] receives the inverse of inner[j].
                let mut out = vec![vec![]; fam.len()];
                for (j, p) in fam.iter().enumerate() {
                    out[self.outer[j]] = inverse(p);
                }
                out
            })
            .collect();
        let mut copies = vec![vec![]; self.copies.len()];
        for (j, p) in self.copies.iter().enumerate() {
            copies[self.outer[j]] = inverse(p);
        }
        GroupPerm {
            outer,
            inner,
            copies,
        }
    }

    /// The flat source index of every position of a member's axis.
    pub fn flat(&self, g: &Group, m: &Member) -> Vec<usize> {
        let (bs, rep) = (g.block_size, m.repeat);
        let fam = self.inner.get(m.family).filter(|f| !f.is_empty());
        let copies = Some(&self.copies).filter(|c| rep > 1 && !c.is_empty());
        let mut out = Vec::with_capacity(g.blocks * rep * bs);
        for j in 0..g.blocks {
            let src = self.outer[j];
            for r in 0..rep {
                let r = copies.map_or(r, |c| c[j][r]);
                for i in 0..bs {
                    let si = fam.map_or(i, |f| f[j][i]);
                    out.push((src * rep + r) * bs + si);
                }
            }
        }
        out
    }
}

impl PermutationSpec {
    /// Checks the spec is well formed: unique group names, every family index
    /// valid, no group on two axes of one weight, no axis in two groups.
    pub fn check(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        let mut axes: HashMap<(&str, usize), &str> = HashMap::new();
        for g in &self.groups {
            if !names.insert(g.name.as_str()) {
                return Err(PermuteError::InvalidSpec(format!(
                    "group '{}' defined twice",
                    g.name
                )));
            }
            if g.blocks == 0 || g.block_size == 0 || g.families.is_empty() {
                return Err(PermuteError::InvalidSpec(format!(
                    "group '{}' is empty",
                    g.name
                )));
            }
            let mut on_weight = std::collections::HashSet::new();
            for m in &g.members {
                if m.family >= g.families.len() || m.repeat == 0 {
                    return Err(PermuteError::InvalidSpec(format!(
                        "group '{}': member '{}' has family {} / repeat {}",
                        g.name, m.weight, m.family, m.repeat
                    )));
                }
                if g.copies == Inner::Free && m.repeat != 1 && m.repeat != g.copy_count() {
                    return Err(PermuteError::InvalidSpec(format!(
                        "group '{}' permutes copies, but member '{}' has {} copies and others {}",
                        g.name,
                        m.weight,
                        m.repeat,
                        g.copy_count()
                    )));
                }
                if !on_weight.insert(m.weight.as_str()) {
                    return Err(PermuteError::InvalidSpec(format!(
                        "group '{}' acts on two axes of '{}'",
                        g.name, m.weight
                    )));
                }
                if let Some(other) = axes.insert((m.weight.as_str(), m.axis), g.name.as_str()) {
                    return Err(PermuteError::InvalidSpec(format!(
                        "axis {} of '{}' is in groups '{other}' and '{}'",
                        m.axis, m.weight, g.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks a checkpoint against the spec: every member weight exists and
    /// has the group's size on its axis.
    pub fn validate(&self, sd: &StateDict, model: &str) -> Result<()> {
        self.check()?;
        for g in &self.groups {
            for m in &g.members {
                let t = sd
                    .get(&m.weight)
                    .ok_or_else(|| PermuteError::MissingWeight {
                        model: model.to_string(),
                        weight: m.weight.clone(),
                    })?;
                let actual = t.shape().get(m.axis).copied().unwrap_or(0);
                if actual != g.axis_len(m) {
                    return Err(PermuteError::GroupSize {
                        weight: m.weight.clone(),
                        axis: m.axis,
                        group: g.name.clone(),
                        expected: g.axis_len(m),
                        actual,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks that `perm` gives every group a valid value.
    pub fn check_value(&self, perm: &Permutation) -> Result<()> {
        for g in &self.groups {
            perm.get(&g.name)
                .ok_or_else(|| PermuteError::BadPermutation {
                    group: g.name.clone(),
                    msg: "no value given".into(),
                })?
                .check(g)?;
        }
        Ok(())
    }

    /// The group by name.
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// A uniformly random value of every group (block order and, for free
    /// families and free copies, each block's unit and copy orders), seeded: the random-permutation
    /// baseline of alignment studies, and planted permutations in tests.
    pub fn random(&self, seed: u64) -> Permutation {
        let mut rng = weights::rng::Rng::new(seed);
        let mut shuffled = |n: usize| {
            let mut p: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut p);
            p
        };
        self.groups
            .iter()
            .map(|g| {
                let outer = shuffled(g.blocks);
                let inner = g
                    .families
                    .iter()
                    .map(|f| match f {
                        Inner::Identity => vec![],
                        Inner::Free => (0..g.blocks).map(|_| shuffled(g.block_size)).collect(),
                    })
                    .collect();
                let copies = match g.copies {
                    Inner::Identity => vec![],
                    Inner::Free => (0..g.blocks).map(|_| shuffled(g.copy_count())).collect(),
                };
                (
                    g.name.clone(),
                    GroupPerm {
                        outer,
                        inner,
                        copies,
                    },
                )
            })
            .collect()
    }

    /// The identity value of every group.
    pub fn identity(&self) -> Permutation {
        self.groups
            .iter()
            .map(|g| (g.name.clone(), GroupPerm::identity(g)))
            .collect()
    }

    /// For each weight, its `(group index, member index)` pairs.
    pub fn by_weight(&self) -> IndexMap<&str, Vec<(usize, usize)>> {
        let mut map: IndexMap<&str, Vec<(usize, usize)>> = IndexMap::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for (mi, m) in g.members.iter().enumerate() {
                map.entry(m.weight.as_str()).or_default().push((gi, mi));
            }
        }
        map
    }
}

/// Permutes one tensor along every axis the spec assigns it, except the axes
/// of group `skip` (used by weight matching).
pub fn permute_tensor(
    spec: &PermutationSpec,
    perm: &Permutation,
    entries: &[(usize, usize)],
    data: &ArrayD<f32>,
    skip: Option<usize>,
) -> ArrayD<f32> {
    gather(data, &permute_index(spec, perm, entries, data.ndim(), skip))
}

/// [`gather`]'s per-axis indices that [`permute_tensor`] applies.
pub(crate) fn permute_index(
    spec: &PermutationSpec,
    perm: &Permutation,
    entries: &[(usize, usize)],
    ndim: usize,
    skip: Option<usize>,
) -> Vec<Option<Vec<usize>>> {
    let mut index: Vec<Option<Vec<usize>>> = vec![None; ndim];
    for &(gi, mi) in entries {
        if Some(gi) == skip {
            continue;
        }
        let g = &spec.groups[gi];
        let m = &g.members[mi];
        index[m.axis] = Some(perm[&g.name].flat(g, m));
    }
    index
}

/// `out[i₀, …, i_k] = data[idx₀[i₀], …, idx_k[i_k]]` in one pass (`None`: the
/// axis is kept as it is; an index may be longer or shorter than its axis,
/// repeating or dropping positions). One gather instead of one `select` copy
/// per axis.
pub fn gather(data: &ArrayD<f32>, index: &[Option<Vec<usize>>]) -> ArrayD<f32> {
    if index.iter().all(Option::is_none) {
        return data.clone();
    }
    let out_shape: Vec<usize> = data
        .shape()
        .iter()
        .zip(index)
        .map(|(&n, p)| p.as_ref().map_or(n, Vec::len))
        .collect();
    let total: usize = out_shape.iter().product();
    let mut out = Vec::new();
    weights::mem::reserve_huge(&mut out, total);
    gathered_rows(data, index, |row, last| match last {
        None => out.extend_from_slice(row),
        Some(p) => out.extend(p.iter().map(|&j| row[j])),
    });
    debug_assert_eq!(out.len(), total);
    ArrayD::from_shape_vec(out_shape, out).expect("same element count")
}

/// The rows (last axis) of [`gather`]'s result, in order, without forming
/// the result: `f` gets each source row and the last axis's index (`None`:
/// the row as it is), so a caller reads `row[j]` for `j` in the index
/// without a copy (`data` must have at least one axis).
pub(crate) fn gathered_rows(
    data: &ArrayD<f32>,
    index: &[Option<Vec<usize>>],
    mut f: impl FnMut(&[f32], Option<&[usize]>),
) {
    let src = data.as_standard_layout();
    let src = src.as_slice().expect("standard layout");
    let shape = data.shape();
    let outer: Vec<usize> = shape[..shape.len() - 1]
        .iter()
        .zip(index)
        .map(|(&n, p)| p.as_ref().map_or(n, Vec::len))
        .collect();
    // Row-major strides of the source.
    let mut strides = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    let at = |axis: usize, i: usize| index[axis].as_ref().map_or(i, |p| p[i]);
    let rows: usize = outer.iter().product();
    let mut pos = vec![0usize; outer.len()];
    let src_last = shape[outer.len()];
    let last = index[outer.len()].as_deref();
    for _ in 0..rows {
        let base: usize = (0..outer.len()).map(|a| at(a, pos[a]) * strides[a]).sum();
        f(&src[base..base + src_last], last);
        // Odometer over the outer axes.
        for a in (0..outer.len()).rev() {
            pos[a] += 1;
            if pos[a] < outer[a] {
                break;
            }
            pos[a] = 0;
        }
    }
}

/// Applies `perm` to every weight of `sd` the spec names (others are copied).
pub fn apply(spec: &PermutationSpec, perm: &Permutation, sd: &StateDict) -> Result<StateDict> {
    spec.validate(sd, "model")?;
    spec.check_value(perm)?;
    let by_weight = spec.by_weight();
    let mut out = StateDict::new();
    out.metadata = sd.metadata.clone();
    for (name, t) in sd.iter() {
        let data = match by_weight.get(name) {
            Some(entries) => permute_tensor(spec, perm, entries, &t.data, None),
            None => t.data.clone(),
        };
        out.insert(name, Tensor::new(data, t.dtype));
    }
    Ok(out)
}

/// The inverse of every group's value.
pub fn invert(perm: &Permutation) -> Permutation {
    perm.iter().map(|(k, v)| (k.clone(), v.inverse())).collect()
}
