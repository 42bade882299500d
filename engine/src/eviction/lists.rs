//! Doubly linked lists threaded through one flat array indexed by entry id: the building
//! block of every policy here. An entry is on at most one list at a time; every operation is
//! O(1) and allocation free once the array has grown to the largest id. Each entry also
//! carries a policy's own data `T` beside its links, so one access touches one place.

use super::EntryId;

pub(super) const NIL: EntryId = EntryId::MAX;

#[derive(Debug, Clone, Copy)]
struct Link {
    prev: EntryId,
    next: EntryId,
    /// The list the entry is on, or `NOT_LISTED`, or `PARKED`.
    list: u8,
}

const NOT_LISTED: u8 = u8::MAX;
/// Not listed, and set aside by its policy until it says otherwise (a parent waiting for its
/// children to leave): a list number, so that it costs no field of its own.
const PARKED: u8 = u8::MAX - 1;

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
    list: NOT_LISTED,
};

#[derive(Debug, Clone, Copy)]
struct Node<T> {
    link: Link,
    data: T,
}

/// `N` lists over one id space, with `T` per entry. Front = most recently pushed; back =
/// oldest.
#[derive(Debug)]
pub(super) struct Lists<const N: usize, T = ()> {
    nodes: Vec<Node<T>>,
    front: [EntryId; N],
    back: [EntryId; N],
    lens: [usize; N],
}

impl<const N: usize, T> Default for Lists<N, T> {
    fn default() -> Self {
        assert!(
            N < PARKED as usize,
            "list numbers must fit below the markers"
        );
        Self {
            nodes: Vec::new(),
            front: [NIL; N],
            back: [NIL; N],
            lens: [0; N],
        }
    }
}

impl<const N: usize, T: Copy + Default> Lists<N, T> {
    /// Makes room for ids up to `id` (new entries' data is `T::default()`). The array grows
    /// by an eighth at a time, not by doubling: a cache that fills to just past a power of
    /// two of blocks would otherwise hold twice the entries it uses.
    pub(super) fn grow_to(&mut self, id: EntryId) {
        assert_ne!(id, NIL, "entry id reserved for the lists' ends");
        if self.nodes.len() <= id as usize {
            let len = id as usize + 1;
            if len > self.nodes.capacity() {
                let grown = self.nodes.capacity() + self.nodes.capacity() / 8;
                self.nodes
                    .reserve_exact(len.max(grown).max(64) - self.nodes.len());
            }
            self.nodes.resize(
                len,
                Node {
                    link: UNLINKED,
                    data: T::default(),
                },
            );
        }
    }

    /// The data of `id` (an id below the largest grown to).
    pub(super) fn data(&self, id: EntryId) -> &T {
        &self.nodes[id as usize].data
    }

    /// The data of `id`, writable.
    pub(super) fn data_mut(&mut self, id: EntryId) -> &mut T {
        &mut self.nodes[id as usize].data
    }

    /// The list `id` is on.
    pub(super) fn list_of(&self, id: EntryId) -> Option<usize> {
        self.nodes
            .get(id as usize)
            .map(|n| usize::from(n.link.list))
            .filter(|&list| list < N)
    }

    /// Whether `id` is parked: on no list, set aside by [`set_parked`](Self::set_parked).
    pub(super) fn is_parked(&self, id: EntryId) -> bool {
        self.nodes
            .get(id as usize)
            .is_some_and(|n| n.link.list == PARKED)
    }

    /// Marks an unlisted `id` parked; pushing it on a list, or [`unpark`](Self::unpark),
    /// ends that.
    pub(super) fn set_parked(&mut self, id: EntryId) {
        debug_assert!(self.list_of(id).is_none(), "entry {id} is listed");
        self.nodes[id as usize].link.list = PARKED;
    }

    /// Ends `id`'s parking, if it was parked (it is then on no list); returns whether it was.
    pub(super) fn unpark(&mut self, id: EntryId) -> bool {
        let parked = self.is_parked(id);
        if parked {
            self.nodes[id as usize].link.list = NOT_LISTED;
        }
        parked
    }

    pub(super) fn len(&self, list: usize) -> usize {
        self.lens[list]
    }

    /// The oldest entry of `list`.
    pub(super) fn back(&self, list: usize) -> Option<EntryId> {
        let id = self.back[list];
        (id != NIL).then_some(id)
    }

    /// Starts loading the entry of `id` (nothing for `NIL`, a list's end).
    pub(super) fn prefetch(&self, id: EntryId) {
        if id != NIL {
            super::prefetch(&self.nodes[id as usize]);
        }
    }

    /// Starts loading the entries on each side of `id` on its list (taking `id` off writes
    /// both).
    pub(super) fn prefetch_neighbours(&self, id: EntryId) {
        let Link { prev, next, .. } = self.nodes[id as usize].link;
        self.prefetch(prev);
        self.prefetch(next);
    }

    /// Starts loading the entry before `id` on its list (the one taking `id` off writes).
    pub(super) fn prefetch_prev(&self, id: EntryId) {
        self.prefetch(self.nodes[id as usize].link.prev);
    }

    /// Puts an unlisted `id` at the front of `list`.
    pub(super) fn push_front(&mut self, list: usize, id: EntryId) {
        debug_assert!(self.list_of(id).is_none(), "entry {id} is already listed");
        let old = self.front[list];
        self.nodes[id as usize].link = Link {
            prev: NIL,
            next: old,
            list: list as u8,
        };
        if old == NIL {
            self.back[list] = id;
        } else {
            self.nodes[old as usize].link.prev = id;
        }
        self.front[list] = id;
        self.lens[list] += 1;
    }

    /// Puts an unlisted `id` at the back of `list`.
    pub(super) fn push_back(&mut self, list: usize, id: EntryId) {
        debug_assert!(self.list_of(id).is_none(), "entry {id} is already listed");
        let old = self.back[list];
        self.nodes[id as usize].link = Link {
            prev: old,
            next: NIL,
            list: list as u8,
        };
        if old == NIL {
            self.front[list] = id;
        } else {
            self.nodes[old as usize].link.next = id;
        }
        self.back[list] = id;
        self.lens[list] += 1;
    }

    /// Takes `id` off whatever list it is on.
    pub(super) fn unlink(&mut self, id: EntryId) {
        let Link { prev, next, list } = self.nodes[id as usize].link;
        debug_assert!(usize::from(list) < N, "entry {id} is not listed");
        let list = usize::from(list);
        if prev == NIL {
            self.front[list] = next;
        } else {
            self.nodes[prev as usize].link.next = next;
        }
        if next == NIL {
            self.back[list] = prev;
        } else {
            self.nodes[next as usize].link.prev = prev;
        }
        self.nodes[id as usize].link = UNLINKED;
        self.lens[list] -= 1;
    }

    /// Moves a listed `id` to the front of `list`.
    pub(super) fn move_to_front(&mut self, list: usize, id: EntryId) {
        if self.front[list] != id || self.list_of(id) != Some(list) {
            self.unlink(id);
            self.push_front(list, id);
        }
    }

    /// The entries of `list`, oldest first.
    pub(super) fn iter_from_back(&self, list: usize) -> impl Iterator<Item = EntryId> + '_ {
        let mut next = self.back[list];
        std::iter::from_fn(move || {
            let id = next;
            (id != NIL).then(|| {
                next = self.nodes[id as usize].link.prev;
                id
            })
        })
    }

    /// Bytes of the per-entry array, as allocated.
    pub(super) fn capacity_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<Node<T>>()
    }
}
