//! The chain links the two chain-aware policies ([`PrefixAware`](super::PrefixAware),
//! [`Adaptive`](super::Adaptive)) keep per entry, and what they do with them: count a
//! parent's resident children, park a parent until its last child leaves, and find the blocks
//! of a chain its caller ended. Each policy orders its entries its own way; this is the part
//! they share.

use super::EntryId;
use super::lists::{Lists, NIL};

/// An entry's place in its chain.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChainLink {
    /// The resident parent when inserted, and its `generation` then.
    parent: EntryId,
    parent_generation: u32,
    /// Bumped on every insert of this id, so a stale child cannot touch a newer entry.
    generation: u32,
    /// Resident entries naming this one as parent.
    pub(super) children: u32,
}

impl ChainLink {
    /// Which incarnation of its id the entry is (bumped on every insert of the id).
    pub(super) fn generation(&self) -> u32 {
        self.generation
    }
}

impl Default for ChainLink {
    fn default() -> Self {
        Self {
            parent: NIL,
            parent_generation: 0,
            generation: 0,
            children: 0,
        }
    }
}

/// Per-entry data that carries a [`ChainLink`].
pub(super) trait Linked {
    fn link(&self) -> &ChainLink;
    fn link_mut(&mut self) -> &mut ChainLink;
}

impl<const N: usize, T: Copy + Default + Linked> Lists<N, T> {
    /// Whether `id` is tracked (on a list, or parked).
    pub(super) fn tracks(&self, id: EntryId) -> bool {
        self.list_of(id).is_some() || self.is_parked(id)
    }

    /// Takes `id` off its list, or out of the parked entries.
    pub(super) fn unlist(&mut self, id: EntryId) {
        if !self.unpark(id) {
            self.unlink(id);
        }
    }

    /// Takes `id` (listed) off its list to wait for its children.
    pub(super) fn park(&mut self, id: EntryId) {
        self.unlink(id);
        self.set_parked(id);
    }

    /// The link of a new incarnation of `id` (grown to, not tracked) under `parent`, counted
    /// as one of the parent's children if the parent is tracked.
    pub(super) fn new_link(&mut self, id: EntryId, parent: Option<EntryId>) -> ChainLink {
        let (parent, parent_generation) = match parent {
            Some(p) if p != id && self.tracks(p) => {
                let link = self.data_mut(p).link_mut();
                link.children += 1;
                (p, link.generation)
            }
            _ => (NIL, 0),
        };
        ChainLink {
            parent,
            parent_generation,
            generation: self.data(id).link().generation.wrapping_add(1),
            children: 0,
        }
    }

    /// The entry `id` was inserted under, while that id still holds the same incarnation
    /// (ids are reused). A removed parent keeps its generation until its id is reused, so
    /// this may name an untracked entry.
    pub(super) fn parent_of(&self, id: EntryId) -> Option<EntryId> {
        let ChainLink {
            parent,
            parent_generation,
            ..
        } = *self.data(id).link();
        (parent != NIL && self.data(parent).link().generation == parent_generation)
            .then_some(parent)
    }

    /// Takes `id` off the lists and out of its parent's children. Returns the parent when it
    /// was parked and has no child left: unparked, for the caller to put back on a list.
    pub(super) fn detach(&mut self, id: EntryId) -> Option<EntryId> {
        self.unlist(id);
        let parent = self.parent_of(id)?;
        let link = self.data_mut(parent).link_mut();
        link.children = link.children.saturating_sub(1);
        if link.children > 0 {
            return None;
        }
        self.unpark(parent).then_some(parent)
    }

    /// Moves the blocks of the chain that ends at `id` to the back of `list`, so they go
    /// first, tail first (each block after its child): `id` and its ancestors up to (not
    /// including) the first that another resident chain goes through, or that is gone.
    /// Nothing when `id` is untracked or has children (the chain goes on). `scratch` is
    /// working space, left empty.
    pub(super) fn end_chain(&mut self, id: EntryId, list: usize, scratch: &mut Vec<EntryId>) {
        if !self.tracks(id) || self.data(id).link().children > 0 {
            return;
        }
        scratch.push(id);
        let mut at = id;
        while let Some(parent) = self
            .parent_of(at)
            .filter(|&p| self.tracks(p) && self.data(p).link().children == 1)
        {
            scratch.push(parent);
            at = parent;
        }
        for &id in scratch.iter().rev() {
            self.unlist(id);
            self.push_back(list, id);
        }
        scratch.clear();
    }
}
