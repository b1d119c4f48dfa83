//! The merged image tree: every layer's entries applied in order with OCI semantics, in memory.
//!
//! Owns the meaning of entries together: whiteouts and opaque directories (image-spec `layer.md`),
//! replacement rules, hardlinks as shared inodes, and resolving paths through the image's own
//! symlinks *inside* the image root. Pure: no file system access. Content is referenced by the
//! stager's ids; ids the tree stops referencing are handed back by [`Tree::take_freed`] so the
//! driver can delete the staged bytes. Leaves parsing to `oci::tar` and writing to `oci::ext4`.
//!
//! # Rules
//! - `.wh.NAME` hides NAME from *lower* layers only: nodes the current layer wrote are kept,
//!   wherever the whiteout sits in the tar. A lower directory that holds something the current
//!   layer wrote is kept, emptied of the rest. `.wh..wh..opq` does the same for every child of
//!   its directory, which stays.
//! - A directory over a directory merges: the children stay and the directory takes the new
//!   owner, mode, time and xattrs (the new set replaces the old, as umoci does). Anything else
//!   replaces what was there, dropping a replaced directory's whole subtree (containerd, umoci).
//! - A hardlink names an inode that exists in the merged tree when the link is applied: its
//!   target's parent is resolved like any parent, its last component is not followed (a link to
//!   a symlink links the symlink). Targets that are missing or directories are refused. The
//!   link's own owner, mode, time and xattrs are applied to the shared inode, as containerd
//!   does after `link(2)`. At most 65000 names per inode (ext4's limit).
//! - Parents are resolved chroot-style: a symlinked parent is followed with absolute targets
//!   taken from the image root and `..` stopping at the root, physically (after resolving the
//!   components before it, as the kernel does; containerd cleans `..` lexically instead), at most
//!   40 symlinks per path (the kernel's limit). Missing directories on the way are created
//!   (0755, root, the entry's time), like containerd's and umoci's `MkdirAll`. A parent that is
//!   a file is refused. The final component of an entry is never followed: a symlink in its place
//!   is replaced. So a layer cannot write anywhere but inside the image, and `bin -> usr/bin`
//!   followed by `bin/sh` writes `usr/bin/sh` as merged-/usr images need.
//! - Whiteouts and opaque markers resolve their parent the same way (as containerd does) but
//!   never create anything: a missing or non-directory parent makes them no-ops.
//! - The root directory takes a root entry's metadata; nothing else may replace it.
//! - Bounds: at most `2 * max_entries` nodes, `max_dir_entries` entries per directory (ext4 and
//!   debugfs cost grow with it), resolved paths of at most `max_path` bytes, the xattrs of an
//!   inode that several hardlink entries added to within ext4's one 4 KiB block, a budget of
//!   symlink-resolution steps per path, and one budget of steps per image that path
//!   resolution, whiteouts, opaque markers and removals all draw from.
//!
//! # Cost of whiteouts
//! Hiding lower layers walks the subtree under a whiteout or opaque marker. Every node that
//! walk keeps is marked clean for the current layer: nothing below it belongs to a lower layer
//! any more, and nothing the same layer adds later can (new nodes are the current layer's). A
//! later whiteout or opaque marker in the same layer stops at a clean node, so each node is
//! walked at most once per layer however many markers repeat, and what the walks do is charged
//! to the image's step budget.

use super::flatten::Limits;
use super::tar::{
    show, xattr_space, Content, Device, Entry, EntryKind, ImagePath, Meta, Name, Xattr,
    XATTR_BLOCK_SPACE,
};
use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

/// Linux's limit on symlinks followed while resolving one path.
pub const MAX_SYMLINKS: u32 = 40;
/// ext4's limit on names per inode (EXT4_LINK_MAX).
pub const MAX_LINKS: u32 = 65_000;
/// Components processed while resolving one path, symlink targets included.
const MAX_STEPS_PER_PATH: u64 = 8192;
/// Steps over the whole image: path components resolved and nodes visited by whiteouts,
/// opaque markers and removals.
const MAX_STEPS_PER_IMAGE: u64 = 256 << 20;

pub type NodeId = u32;
pub type InodeId = u32;
pub const ROOT: NodeId = 0;

impl Borrow<[u8]> for Name {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// A directory: its entries by name, its metadata.
#[derive(Debug, Clone)]
pub struct Dir {
    pub children: BTreeMap<Name, NodeId>,
    pub meta: Meta,
    pub xattrs: Vec<Xattr>,
}

/// What a non-directory inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InodeKind {
    File(Content),
    Symlink(Box<[u8]>),
    Char(Device),
    Block(Device),
    Fifo,
}

/// A non-directory inode, possibly with several names.
#[derive(Debug, Clone)]
pub struct Inode {
    pub kind: InodeKind,
    pub meta: Meta,
    pub xattrs: Vec<Xattr>,
    /// Names in the tree; 0 once it is gone.
    pub links: u32,
}

#[derive(Debug)]
enum NodeKind {
    Dir(Box<Dir>),
    Leaf(InodeId),
    Removed,
}

#[derive(Debug)]
struct Node {
    /// The layer that last wrote this node (whiteouts only hide lower layers).
    layer: u32,
    /// The tree's `generation` in which this node's subtree was last known to hold nothing a
    /// whiteout of that layer would remove (0: never); see "Cost of whiteouts".
    clean: u32,
    kind: NodeKind,
}

/// A node as the ext4 writer sees it.
pub enum NodeRef<'a> {
    Dir(&'a Dir),
    Leaf(InodeId, &'a Inode),
}

#[derive(Debug, thiserror::Error)]
pub enum TreeErrorKind {
    #[error("its parent `{0}` is not a directory")]
    NotADirectory(String),
    #[error("more than {MAX_SYMLINKS} symlinks while resolving its parent directory")]
    SymlinkLoop,
    #[error("resolving its parent through symlinks takes too many steps")]
    ResolutionBudget,
    #[error("takes the image's paths, symlinks and whiteouts above {max} steps to apply (limit)")]
    WorkBudget { max: u64 },
    #[error("has extended attributes that, with those its other hardlinks gave the same inode, need {len} bytes; ext4 keeps an inode's attributes in one 4096-byte block, which holds {max}")]
    XattrsTooLarge { len: usize, max: usize },
    #[error("comes after more layers than banger can count")]
    TooManyLayers,
    #[error("resolves to a path longer than {max} bytes")]
    PathTooLong { max: usize },
    #[error("resolves through a symlink to a component longer than {max} bytes")]
    NameTooLong { max: usize },
    #[error("resolves through a symlink to an invalid name `{0}`")]
    BadComponent(String),
    #[error("is a hardlink to `{0}`, which does not exist in the image at this point")]
    HardlinkMissing(String),
    #[error("is a hardlink to `{0}`, which is a directory")]
    HardlinkToDir(String),
    #[error("is a hardlink to `{0}`, which already has {MAX_LINKS} names (ext4's limit)")]
    TooManyLinks(String),
    #[error("would replace the image root with a non-directory")]
    RootNotDir,
    #[error("the image has more than {max} files and directories (limit)")]
    TooManyNodes { max: u64 },
    #[error("its directory has more than {max} entries (limit)")]
    DirTooLarge { max: usize },
}

/// An entry the tree refused, with its path.
#[derive(Debug, thiserror::Error)]
#[error("entry `{path}` {kind}")]
pub struct TreeError {
    pub path: String,
    pub kind: TreeErrorKind,
}

/// Counts the ext4 writer sizes the file system from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeStats {
    pub dirs: u64,
    /// Non-directory inodes.
    pub inodes: u64,
    /// Regular-file inodes.
    pub files: u64,
    /// Bytes of regular-file content (each inode once).
    pub content_bytes: u64,
    /// 4 KiB blocks for file content, directory entries, long symlinks and xattrs.
    pub blocks: u64,
}

enum Walk {
    Dir(NodeId, usize),
    Missing,
    NotDir(Vec<u8>),
}

pub struct Tree {
    nodes: Vec<Node>,
    inodes: Vec<Inode>,
    max_nodes: u64,
    max_dir_entries: usize,
    max_path: usize,
    max_name: usize,
    layer: u32,
    /// Counts layer changes, from 1: what `Node::clean` refers to.
    generation: u32,
    steps: u64,
    max_steps: u64,
    freed: Vec<u64>,
}

impl Tree {
    /// A tree holding only the root directory (0755, root, time 0).
    pub fn new(limits: &Limits) -> Self {
        Self {
            nodes: vec![Node {
                layer: 0,
                clean: 0,
                kind: NodeKind::Dir(Box::new(Dir {
                    children: BTreeMap::new(),
                    meta: Meta {
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                    },
                    xattrs: Vec::new(),
                })),
            }],
            inodes: Vec::new(),
            max_nodes: limits.max_entries.saturating_mul(2),
            max_dir_entries: limits.max_dir_entries,
            max_path: limits.max_path,
            max_name: limits.max_name,
            layer: 0,
            generation: 1,
            steps: 0,
            max_steps: MAX_STEPS_PER_IMAGE,
            freed: Vec::new(),
        }
    }

    /// Staged content ids no longer referenced (since the last call).
    pub fn take_freed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.freed)
    }

    pub fn root(&self) -> &Dir {
        self.dir(ROOT)
    }

    pub fn node(&self, id: NodeId) -> Option<NodeRef<'_>> {
        match &self.nodes.get(id as usize)?.kind {
            NodeKind::Dir(d) => Some(NodeRef::Dir(d)),
            NodeKind::Leaf(i) => Some(NodeRef::Leaf(*i, &self.inodes[*i as usize])),
            NodeKind::Removed => None,
        }
    }

    pub fn inode(&self, id: InodeId) -> &Inode {
        &self.inodes[id as usize]
    }

    fn dir(&self, id: NodeId) -> &Dir {
        match &self.nodes[id as usize].kind {
            NodeKind::Dir(d) => d,
            // Only called with ids known to be directories.
            _ => unreachable_dir(),
        }
    }

    fn dir_mut(&mut self, id: NodeId) -> &mut Dir {
        match &mut self.nodes[id as usize].kind {
            NodeKind::Dir(d) => d,
            _ => unreachable_dir(),
        }
    }

    fn push_node(&mut self, node: Node) -> Result<NodeId, TreeErrorKind> {
        if self.nodes.len() as u64 >= self.max_nodes {
            return Err(TreeErrorKind::TooManyNodes {
                max: self.max_nodes,
            });
        }
        self.nodes.push(node);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn insert_child(
        &mut self,
        parent: NodeId,
        name: Name,
        node: Node,
    ) -> Result<NodeId, TreeErrorKind> {
        if self.dir(parent).children.len() >= self.max_dir_entries {
            return Err(TreeErrorKind::DirTooLarge {
                max: self.max_dir_entries,
            });
        }
        let id = self.push_node(node)?;
        self.dir_mut(parent).children.insert(name, id);
        Ok(id)
    }

    /// Resolves `comps` as a directory inside the image (see the module rules). With `create`,
    /// missing directories are made with that metadata.
    fn walk(&mut self, comps: &[Name], create: Option<&Meta>) -> Result<Walk, TreeErrorKind> {
        let mut stack: Vec<(NodeId, usize)> = vec![(ROOT, 0)];
        // Components still to walk, last one first.
        let mut todo: Vec<Box<[u8]>> = comps.iter().rev().map(|n| n.as_bytes().into()).collect();
        let mut links = 0;
        let mut steps = 0u64;
        while let Some(c) = todo.pop() {
            steps += 1;
            if steps > MAX_STEPS_PER_PATH {
                return Err(TreeErrorKind::ResolutionBudget);
            }
            self.charge(1)?;
            match &*c {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let (cur, cur_len) = stack[stack.len() - 1];
            let len = cur_len + 1 + c.len();
            match self.dir(cur).children.get(&*c).copied() {
                None => {
                    let Some(meta) = create else {
                        return Ok(Walk::Missing);
                    };
                    if c.len() > self.max_name {
                        return Err(TreeErrorKind::NameTooLong { max: self.max_name });
                    }
                    if len > self.max_path {
                        return Err(TreeErrorKind::PathTooLong { max: self.max_path });
                    }
                    // Symlink targets were checked for NUL, CR and LF at the tar boundary.
                    let name =
                        Name::new(&c).ok_or_else(|| TreeErrorKind::BadComponent(show(&c)))?;
                    let id = self.insert_child(cur, name, self.new_dir(*meta, Vec::new()))?;
                    stack.push((id, len));
                }
                Some(id) => match &self.nodes[id as usize].kind {
                    NodeKind::Dir(_) => {
                        if len > self.max_path {
                            return Err(TreeErrorKind::PathTooLong { max: self.max_path });
                        }
                        stack.push((id, len));
                    }
                    NodeKind::Leaf(ino) => {
                        let InodeKind::Symlink(target) = &self.inodes[*ino as usize].kind else {
                            let mut path = self.stack_path(&stack);
                            path.push(b'/');
                            path.extend_from_slice(&c);
                            return Ok(Walk::NotDir(path));
                        };
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(TreeErrorKind::SymlinkLoop);
                        }
                        if target.starts_with(b"/") {
                            stack.truncate(1);
                        }
                        todo.extend(target.split(|&b| b == b'/').rev().map(Box::from));
                    }
                    NodeKind::Removed => return Ok(Walk::Missing),
                },
            }
        }
        let (id, len) = stack[stack.len() - 1];
        Ok(Walk::Dir(id, len))
    }

    /// The path of a resolution stack, for messages.
    fn stack_path(&self, stack: &[(NodeId, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        for pair in stack.windows(2) {
            let (parent, child) = (pair[0].0, pair[1].0);
            if let Some((name, _)) = self
                .dir(parent)
                .children
                .iter()
                .find(|(_, &id)| id == child)
            {
                out.push(b'/');
                out.extend_from_slice(name.as_bytes());
            }
        }
        out
    }

    /// Counts `n` steps against the image's budget.
    fn charge(&mut self, n: u64) -> Result<(), TreeErrorKind> {
        self.steps = self.steps.saturating_add(n);
        if self.steps > self.max_steps {
            return Err(TreeErrorKind::WorkBudget {
                max: self.max_steps,
            });
        }
        Ok(())
    }

    /// A node the current layer writes: its (empty or leaf) subtree is clean.
    fn new_node(&self, kind: NodeKind) -> Node {
        Node {
            layer: self.layer,
            clean: self.generation,
            kind,
        }
    }

    fn new_dir(&self, meta: Meta, xattrs: Vec<Xattr>) -> Node {
        Node {
            layer: self.layer,
            clean: self.generation,
            kind: NodeKind::Dir(Box::new(Dir {
                children: BTreeMap::new(),
                meta,
                xattrs,
            })),
        }
    }

    /// Applies one entry of layer `layer` (layers must come in order, lowest first).
    pub fn apply(&mut self, layer: u32, entry: Entry) -> Result<(), TreeError> {
        let path = || entry.path.to_string();
        if layer != self.layer {
            self.layer = layer;
            match self.generation.checked_add(1) {
                Some(g) => self.generation = g,
                None => {
                    return Err(TreeError {
                        path: path(),
                        kind: TreeErrorKind::TooManyLayers,
                    })
                }
            }
        }
        let path = path();
        self.apply_inner(entry)
            .map_err(|kind| TreeError { path, kind })
    }

    fn apply_inner(&mut self, e: Entry) -> Result<(), TreeErrorKind> {
        let Entry {
            path,
            kind,
            meta,
            xattrs,
        } = e;
        match kind {
            EntryKind::Whiteout => {
                let Some((name, parent)) = path.split_last() else {
                    return Ok(());
                };
                if let Walk::Dir(dir, _) = self.walk(parent, None)? {
                    self.hide_lower(dir, name.as_bytes())?;
                }
                return Ok(());
            }
            EntryKind::Opaque => {
                if let Walk::Dir(dir, _) = self.walk(path.components(), None)? {
                    self.prune_children(dir)?;
                }
                return Ok(());
            }
            _ => {}
        }
        let Some((name, parent)) = path.split_last() else {
            if kind != EntryKind::Dir {
                return Err(TreeErrorKind::RootNotDir);
            }
            self.nodes[ROOT as usize].layer = self.layer;
            let root = self.dir_mut(ROOT);
            root.meta = meta;
            root.xattrs = xattrs;
            return Ok(());
        };

        // A hardlink's inode is found before anything at the new path is removed.
        let link_inode = match &kind {
            EntryKind::Hardlink(target) => Some(self.link_target(target)?),
            _ => None,
        };
        let implicit = Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: meta.mtime,
        };
        let (dir, dir_len) = match self.walk(parent, Some(&implicit))? {
            Walk::Dir(d, l) => (d, l),
            Walk::NotDir(p) => return Err(TreeErrorKind::NotADirectory(show(&p))),
            Walk::Missing => return Err(TreeErrorKind::NotADirectory(path.to_string())),
        };
        if dir_len + 1 + name.as_bytes().len() > self.max_path {
            return Err(TreeErrorKind::PathTooLong { max: self.max_path });
        }
        let existing = self.dir(dir).children.get(name).copied();
        if let Some(old) = existing {
            match (&self.nodes[old as usize].kind, &kind, link_inode) {
                (NodeKind::Dir(_), EntryKind::Dir, _) => {
                    self.nodes[old as usize].layer = self.layer;
                    let d = self.dir_mut(old);
                    d.meta = meta;
                    d.xattrs = xattrs;
                    return Ok(());
                }
                (NodeKind::Leaf(i), EntryKind::Hardlink(_), Some(l)) if *i == l => {
                    self.nodes[old as usize].layer = self.layer;
                    self.update_inode(l, meta, xattrs)?;
                    return Ok(());
                }
                _ => {}
            }
            if let Some(l) = link_inode {
                // Count the new name first, so removing the old node (maybe another name of
                // the same inode) cannot free the inode.
                self.inodes[l as usize].links += 1;
            }
            self.dir_mut(dir).children.remove(name);
            self.remove_subtree(old)?;
        } else if let Some(l) = link_inode {
            self.inodes[l as usize].links += 1;
        }
        let node = match kind {
            EntryKind::Dir => self.new_dir(meta, xattrs),
            EntryKind::Hardlink(_) => {
                let l = link_inode.ok_or(TreeErrorKind::RootNotDir)?;
                self.update_inode(l, meta, xattrs)?;
                self.new_node(NodeKind::Leaf(l))
            }
            other => {
                let kind = match other {
                    EntryKind::File(c) => InodeKind::File(c),
                    EntryKind::Symlink(t) => InodeKind::Symlink(t),
                    EntryKind::Char(d) => InodeKind::Char(d),
                    EntryKind::Block(d) => InodeKind::Block(d),
                    // Fifo; whiteouts, opaque markers, dirs and links are handled above.
                    _ => InodeKind::Fifo,
                };
                self.inodes.push(Inode {
                    kind,
                    meta,
                    xattrs,
                    links: 1,
                });
                self.new_node(NodeKind::Leaf((self.inodes.len() - 1) as InodeId))
            }
        };
        self.insert_child(dir, name.clone(), node)?;
        Ok(())
    }

    /// A hardlink entry's metadata and xattrs applied to the inode it names.
    fn update_inode(
        &mut self,
        id: InodeId,
        meta: Meta,
        xattrs: Vec<Xattr>,
    ) -> Result<(), TreeErrorKind> {
        let inode = &mut self.inodes[id as usize];
        inode.meta = meta;
        if xattrs.is_empty() {
            return Ok(());
        }
        // Each entry's set fits one block (checked at the tar boundary); their union may not.
        let mut merged = inode.xattrs.clone();
        for x in xattrs {
            merged.retain(|old| old.name != x.name);
            merged.push(x);
        }
        let space = xattr_space(&merged);
        if space > XATTR_BLOCK_SPACE {
            return Err(TreeErrorKind::XattrsTooLarge {
                len: space,
                max: XATTR_BLOCK_SPACE,
            });
        }
        merged.sort_by(|a, b| a.name.cmp(&b.name));
        inode.xattrs = merged;
        Ok(())
    }

    /// The inode a hardlink target names (last component not followed).
    fn link_target(&mut self, target: &ImagePath) -> Result<InodeId, TreeErrorKind> {
        let shown = || target.to_string();
        let Some((name, parent)) = target.split_last() else {
            return Err(TreeErrorKind::HardlinkToDir(shown()));
        };
        let Walk::Dir(dir, _) = self.walk(parent, None)? else {
            return Err(TreeErrorKind::HardlinkMissing(shown()));
        };
        let Some(id) = self.dir(dir).children.get(name).copied() else {
            return Err(TreeErrorKind::HardlinkMissing(shown()));
        };
        match self.nodes[id as usize].kind {
            NodeKind::Leaf(i) => {
                if self.inodes[i as usize].links >= MAX_LINKS {
                    return Err(TreeErrorKind::TooManyLinks(shown()));
                }
                Ok(i)
            }
            NodeKind::Dir(_) => Err(TreeErrorKind::HardlinkToDir(shown())),
            NodeKind::Removed => Err(TreeErrorKind::HardlinkMissing(shown())),
        }
    }

    /// Hides what lower layers put at `dir/name`, keeping what the current layer wrote.
    fn hide_lower(&mut self, dir: NodeId, name: &[u8]) -> Result<(), TreeErrorKind> {
        let Some(id) = self.dir(dir).children.get(name).copied() else {
            return Ok(());
        };
        if !self.prune_lower(id)? {
            self.dir_mut(dir).children.remove(name);
            self.remove_subtree(id)?;
        }
        Ok(())
    }

    /// Removes lower-layer descendants of `id`; says whether `id` itself stays (it is the
    /// current layer's, or a directory still holding something that is).
    fn prune_lower(&mut self, id: NodeId) -> Result<bool, TreeErrorKind> {
        self.charge(1)?;
        let current = self.nodes[id as usize].layer == self.layer;
        if !matches!(self.nodes[id as usize].kind, NodeKind::Dir(_)) {
            return Ok(current);
        }
        // Depth is bounded by max_path / 2.
        self.prune_children(id)?;
        Ok(current || !self.dir(id).children.is_empty())
    }

    /// Removes lower-layer descendants of the directory `id` (an opaque marker); it stays.
    fn prune_children(&mut self, id: NodeId) -> Result<(), TreeErrorKind> {
        if self.nodes[id as usize].clean == self.generation {
            return Ok(());
        }
        let children: Vec<NodeId> = self.dir(id).children.values().copied().collect();
        let mut gone = Vec::new();
        for child in children {
            if !self.prune_lower(child)? {
                gone.push(child);
            }
        }
        if !gone.is_empty() {
            gone.sort_unstable();
            self.dir_mut(id)
                .children
                .retain(|_, c| gone.binary_search(c).is_err());
            for child in gone {
                self.remove_subtree(child)?;
            }
        }
        self.nodes[id as usize].clean = self.generation;
        Ok(())
    }

    /// Drops a detached node and everything under it, freeing content nobody names any more.
    fn remove_subtree(&mut self, id: NodeId) -> Result<(), TreeErrorKind> {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            self.charge(1)?;
            match std::mem::replace(&mut self.nodes[id as usize].kind, NodeKind::Removed) {
                NodeKind::Dir(d) => stack.extend(d.children.values()),
                NodeKind::Leaf(i) => {
                    let inode = &mut self.inodes[i as usize];
                    inode.links = inode.links.saturating_sub(1);
                    if inode.links == 0 {
                        if let InodeKind::File(Content::Staged { id, .. }) = inode.kind {
                            self.freed.push(id);
                        }
                    }
                }
                NodeKind::Removed => {}
            }
        }
        Ok(())
    }

    /// Sizes for the ext4 writer.
    pub fn stats(&self) -> TreeStats {
        const BS: u64 = 4096;
        let mut s = TreeStats::default();
        let mut seen = vec![false; self.inodes.len()];
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            match &self.nodes[id as usize].kind {
                NodeKind::Dir(d) => {
                    s.dirs += 1;
                    // Directory entries: 8 bytes + the name rounded to 4, plus `.` and `..`.
                    let bytes: u64 = d
                        .children
                        .keys()
                        .map(|n| 8 + (n.as_bytes().len() as u64).next_multiple_of(4))
                        .sum::<u64>()
                        + 24;
                    s.blocks += bytes.div_ceil(BS - 64).max(1);
                    if !d.xattrs.is_empty() {
                        s.blocks += 1;
                    }
                    stack.extend(d.children.values());
                }
                NodeKind::Leaf(i) => {
                    if std::mem::replace(&mut seen[*i as usize], true) {
                        continue;
                    }
                    let inode = &self.inodes[*i as usize];
                    s.inodes += 1;
                    match &inode.kind {
                        InodeKind::File(c) => {
                            s.files += 1;
                            s.content_bytes += c.size();
                            // Data blocks plus one extent block per 128 MiB, generously.
                            s.blocks += c.size().div_ceil(BS) + c.size() / (128 << 20);
                        }
                        InodeKind::Symlink(t) if t.len() >= 60 => s.blocks += 1,
                        _ => {}
                    }
                    if !inode.xattrs.is_empty() {
                        s.blocks += 1;
                    }
                }
                NodeKind::Removed => {}
            }
        }
        s
    }

    /// Every path with a one-line description, sorted (for tests and debugging).
    pub fn listing(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack: Vec<(NodeId, Vec<u8>)> = vec![(ROOT, Vec::new())];
        while let Some((id, path)) = stack.pop() {
            let shown = if path.is_empty() {
                "/".to_string()
            } else {
                show(&path)
            };
            match self.node(id) {
                Some(NodeRef::Dir(d)) => {
                    out.push(format!("{shown} dir {}", meta_str(&d.meta)));
                    for (n, c) in &d.children {
                        let mut p = path.clone();
                        p.push(b'/');
                        p.extend_from_slice(n.as_bytes());
                        stack.push((*c, p));
                    }
                }
                Some(NodeRef::Leaf(i, inode)) => {
                    let what = match &inode.kind {
                        InodeKind::File(c) => format!("file {} bytes", c.size()),
                        InodeKind::Symlink(t) => format!("symlink -> {}", show(t)),
                        InodeKind::Char(d) => format!("char {},{}", d.major, d.minor),
                        InodeKind::Block(d) => format!("block {},{}", d.major, d.minor),
                        InodeKind::Fifo => "fifo".to_string(),
                    };
                    let links = if inode.links > 1 {
                        format!(" inode {i} links {}", inode.links)
                    } else {
                        String::new()
                    };
                    out.push(format!("{shown} {what} {}{links}", meta_str(&inode.meta)));
                }
                None => {}
            }
        }
        out.sort();
        out
    }
}

fn meta_str(m: &Meta) -> String {
    format!("{:04o} {}:{} @{}", m.mode, m.uid, m.gid, m.mtime)
}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.listing()).finish()
    }
}

/// Node ids handed to `dir`/`dir_mut` always name directories; a broken invariant is a bug.
#[cold]
fn unreachable_dir() -> ! {
    panic!("internal error: tree node is not a directory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::tar::normalise;

    fn p(s: &str) -> ImagePath {
        normalise(s.as_bytes(), &Limits::default()).unwrap()
    }

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: 7,
        }
    }

    fn e(path: &str, kind: EntryKind) -> Entry {
        let mode = match kind {
            EntryKind::Dir => 0o755,
            _ => 0o644,
        };
        Entry {
            path: p(path),
            kind,
            meta: meta(mode),
            xattrs: vec![],
        }
    }

    fn file(path: &str, id: u64) -> Entry {
        e(path, EntryKind::File(Content::Staged { id, size: 1 }))
    }
    fn dir(path: &str) -> Entry {
        e(path, EntryKind::Dir)
    }
    fn sym(path: &str, target: &str) -> Entry {
        e(path, EntryKind::Symlink(target.as_bytes().into()))
    }
    fn hard(path: &str, target: &str) -> Entry {
        e(path, EntryKind::Hardlink(p(target)))
    }
    fn wh(path: &str) -> Entry {
        e(path, EntryKind::Whiteout)
    }
    fn opq(path: &str) -> Entry {
        e(path, EntryKind::Opaque)
    }

    /// Applies layers (lists of entries) in order; returns the tree.
    fn build(layers: Vec<Vec<Entry>>) -> Tree {
        try_build(layers).unwrap()
    }

    fn try_build(layers: Vec<Vec<Entry>>) -> Result<Tree, TreeError> {
        let mut t = Tree::new(&Limits::default());
        for (i, l) in layers.into_iter().enumerate() {
            for entry in l {
                t.apply(i as u32, entry)?;
            }
        }
        Ok(t)
    }

    /// Paths only, for short assertions.
    fn names(t: &Tree) -> Vec<String> {
        t.listing()
            .into_iter()
            .map(|l| l.split(' ').next().unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn a_whiteout_hides_lower_layers_only_in_any_order() {
        let t = build(vec![
            vec![dir("a"), file("a/x", 1), file("a/y", 2)],
            // The same layer recreates x before and y after its whiteouts.
            vec![file("a/x", 3), wh("a/x"), wh("a/y"), file("a/y", 4)],
        ]);
        assert_eq!(names(&t), ["/", "/a", "/a/x", "/a/y"]);
        let mut t = build(vec![vec![dir("a"), file("a/x", 1)], vec![wh("a/x")]]);
        assert_eq!(names(&t), ["/", "/a"]);
        assert_eq!(t.take_freed(), vec![1]);
    }

    #[test]
    fn a_whiteout_of_a_lower_dir_keeps_what_this_layer_wrote_inside() {
        let t = build(vec![
            vec![
                dir("d"),
                file("d/old", 1),
                dir("d/sub"),
                file("d/sub/deep", 2),
            ],
            vec![file("d/new", 3), wh("d")],
        ]);
        assert_eq!(names(&t), ["/", "/d", "/d/new"]);
        let t = build(vec![vec![dir("d"), file("d/old", 1)], vec![wh("d")]]);
        assert_eq!(names(&t), ["/"]);
    }

    #[test]
    fn an_opaque_dir_keeps_itself_and_this_layers_entries() {
        let t = build(vec![
            vec![dir("d"), file("d/old", 1), dir("d/sub"), file("d/sub/x", 2)],
            vec![file("d/new", 3), opq("d"), dir("d/sub"), file("d/late", 4)],
        ]);
        assert_eq!(names(&t), ["/", "/d", "/d/late", "/d/new", "/d/sub"]);
        // Opaque on a missing dir or a file does nothing.
        let t = build(vec![vec![file("f", 1)], vec![opq("f"), opq("missing/x")]]);
        assert_eq!(names(&t), ["/", "/f"]);
    }

    #[test]
    fn replacing_a_dir_with_a_file_drops_its_subtree_and_frees_content() {
        let mut t = build(vec![
            vec![dir("d"), file("d/a", 1), dir("d/e"), file("d/e/b", 2)],
            vec![file("d", 3)],
        ]);
        assert_eq!(names(&t), ["/", "/d"]);
        let mut freed = t.take_freed();
        freed.sort();
        assert_eq!(freed, vec![1, 2]);
        // Replacing a file frees the old content too.
        let mut t = build(vec![vec![file("f", 1), file("f", 2)]]);
        assert_eq!(t.take_freed(), vec![1]);
    }

    #[test]
    fn a_dir_over_a_dir_merges_and_takes_the_new_metadata() {
        let mut newer = dir("d");
        newer.meta = Meta {
            mode: 0o1777,
            uid: 5,
            gid: 6,
            mtime: 99,
        };
        let t = build(vec![vec![dir("d"), file("d/keep", 1)], vec![newer]]);
        assert_eq!(
            t.listing(),
            [
                "/ dir 0755 0:0 @0",
                "/d dir 1777 5:6 @99",
                "/d/keep file 1 bytes 0644 0:0 @7"
            ]
        );
    }

    #[test]
    fn a_dir_over_a_symlink_replaces_the_symlink() {
        // The "chmod outside" case: the directory entry does not go through the link.
        let t = build(vec![vec![sym("etc", "/host/etc")], vec![dir("etc")]]);
        assert_eq!(t.listing(), ["/ dir 0755 0:0 @0", "/etc dir 0755 0:0 @7"]);
    }

    #[test]
    fn writes_through_a_symlinked_parent_stay_inside_the_image() {
        let t = build(vec![
            vec![
                dir("usr"),
                dir("usr/bin"),
                sym("bin", "usr/bin"),
                sym("lib", "/usr/lib"),
            ],
            vec![file("bin/sh", 1), file("lib/libc.so", 2)],
        ]);
        assert_eq!(
            names(&t),
            [
                "/",
                "/bin",
                "/lib",
                "/usr",
                "/usr/bin",
                "/usr/bin/sh",
                "/usr/lib",
                "/usr/lib/libc.so"
            ]
        );
        // Absolute and `..` targets are taken from the image root and clamped there.
        let t = build(vec![
            vec![
                sym("up", ".."),
                sym("abs", "/../../host"),
                sym("etc2", "/etc"),
            ],
            vec![dir("up/up/x"), file("abs/f", 1), file("etc2/passwd", 2)],
        ]);
        assert_eq!(
            names(&t),
            [
                "/",
                "/abs",
                "/etc",
                "/etc/passwd",
                "/etc2",
                "/host",
                "/host/f",
                "/up",
                "/x"
            ]
        );
    }

    #[test]
    fn symlink_loops_and_files_as_parents_are_refused() {
        let err = try_build(vec![vec![sym("a", "b"), sym("b", "a"), file("a/x", 1)]]).unwrap_err();
        assert!(matches!(err.kind, TreeErrorKind::SymlinkLoop), "{err}");
        assert_eq!(err.path, "/a/x");
        let err = try_build(vec![vec![file("f", 1), file("f/x", 2)]]).unwrap_err();
        assert!(
            matches!(err.kind, TreeErrorKind::NotADirectory(ref p) if p == "/f"),
            "{err}"
        );
        let err = try_build(vec![vec![file("f", 1), sym("l", "f"), file("l/x", 2)]]).unwrap_err();
        assert!(matches!(err.kind, TreeErrorKind::NotADirectory(_)), "{err}");
        // 40 symlinks are fine, 41 are not.
        let chain = |n: usize| {
            let mut l: Vec<Entry> = (0..n)
                .map(|i| sym(&format!("l{i}"), &format!("l{}", i + 1)))
                .collect();
            l.push(dir(&format!("l{n}")));
            l.push(file("l0/x", 1));
            l
        };
        assert!(try_build(vec![chain(40)]).is_ok());
        assert!(matches!(
            try_build(vec![chain(41)]).unwrap_err().kind,
            TreeErrorKind::SymlinkLoop
        ));
    }

    #[test]
    fn a_dangling_symlinked_parent_creates_the_missing_dirs_inside() {
        let t = build(vec![vec![sym("l", "/nonexistent/dir"), file("l/f", 1)]]);
        assert_eq!(
            names(&t),
            [
                "/",
                "/l",
                "/nonexistent",
                "/nonexistent/dir",
                "/nonexistent/dir/f"
            ]
        );
    }

    #[test]
    fn whiteouts_resolve_their_parent_through_symlinks_and_create_nothing() {
        let t = build(vec![
            vec![dir("etc"), file("etc/passwd", 1), sym("lnk", "/etc")],
            vec![wh("lnk/passwd"), wh("missing/x"), wh("lnk/nothing")],
        ]);
        assert_eq!(names(&t), ["/", "/etc", "/lnk"]);
    }

    #[test]
    fn hardlinks_share_an_inode() {
        let mut owned = hard("bin/ash", "bin/busybox");
        owned.meta = Meta {
            mode: 0o4755,
            uid: 0,
            gid: 0,
            mtime: 8,
        };
        let t = build(vec![
            vec![
                dir("bin"),
                file("bin/busybox", 1),
                hard("bin/sh", "/bin/busybox"),
            ],
            vec![owned],
        ]);
        let l = t.listing();
        assert_eq!(l.len(), 5, "{l:?}");
        for line in &l[2..] {
            // The last link's metadata is the inode's.
            assert!(line.ends_with("4755 0:0 @8 inode 0 links 3"), "{line}");
        }
        // Replacing one name keeps the inode for the others.
        let mut t = build(vec![vec![file("a", 1), hard("b", "a")], vec![file("a", 2)]]);
        assert!(t.take_freed().is_empty());
        assert_eq!(t.inode(0).links, 1);
        // A link named like its own target changes nothing.
        let t = build(vec![vec![file("a", 1), hard("a", "a")]]);
        assert_eq!(t.inode(0).links, 1);
        // Through a symlinked parent, and to a symlink itself.
        let t = build(vec![vec![
            dir("usr"),
            file("usr/f", 1),
            sym("u", "usr"),
            hard("g", "u/f"),
            hard("u2", "u"),
        ]]);
        assert_eq!(t.inode(0).links, 2);
        assert_eq!(t.inode(1).links, 2);
    }

    #[test]
    fn hardlinks_to_missing_entries_or_dirs_are_refused() {
        for (target, want) in [
            ("nothere", "does not exist"),
            ("d", "is a directory"),
            ("f/x", "does not exist"),
        ] {
            let err = try_build(vec![vec![dir("d"), file("f", 1), hard("l", target)]]).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
        // A target hidden by a whiteout of this layer is gone.
        let err = try_build(vec![vec![file("f", 1)], vec![wh("f"), hard("l", "f")]]).unwrap_err();
        assert!(matches!(err.kind, TreeErrorKind::HardlinkMissing(_)));
    }

    #[test]
    fn the_root_takes_metadata_but_is_never_replaced() {
        let mut root = dir("/");
        root.meta.mode = 0o700;
        let t = build(vec![vec![root]]);
        assert_eq!(t.listing(), ["/ dir 0700 0:0 @7"]);
        let err = try_build(vec![vec![sym("/", "/etc")]]).unwrap_err();
        assert!(matches!(err.kind, TreeErrorKind::RootNotDir));
        // A whiteout or opaque marker of the root only hides lower content.
        let t = build(vec![vec![file("a", 1)], vec![opq("/"), file("b", 2)]]);
        assert_eq!(names(&t), ["/", "/b"]);
    }

    #[test]
    fn directory_size_nodes_and_resolved_paths_are_bounded() {
        let limits = Limits {
            max_dir_entries: 2,
            ..Limits::default()
        };
        let mut t = Tree::new(&limits);
        t.apply(0, file("a", 1)).unwrap();
        t.apply(0, file("b", 2)).unwrap();
        let err = t.apply(0, file("c", 3)).unwrap_err();
        assert!(matches!(err.kind, TreeErrorKind::DirTooLarge { max: 2 }));
        // Replacing an existing name is fine at the limit.
        t.apply(0, file("b", 4)).unwrap();

        let limits = Limits {
            max_entries: 2,
            ..Limits::default()
        };
        let mut t = Tree::new(&limits);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            t.apply(0, file(name, i as u64)).unwrap();
        }
        assert!(matches!(
            t.apply(0, file("d", 9)).unwrap_err().kind,
            TreeErrorKind::TooManyNodes { max: 4 }
        ));

        // Symlinks can make a path longer than any entry name: still bounded.
        let long = "x".repeat(250);
        let target = vec![long.as_str(); 16].join("/");
        let result = try_build(vec![vec![
            sym("m", &format!("/{target}")),
            file(&format!("m/{long}/z"), 2),
        ]]);
        match result {
            Err(e) => assert!(
                matches!(e.kind, TreeErrorKind::PathTooLong { max: 4096 }),
                "{e}"
            ),
            Ok(_) => panic!("a path above 4096 bytes was accepted"),
        }
    }

    #[test]
    fn repeated_opaque_markers_and_whiteouts_take_linear_time() {
        const N: u64 = 50_000;
        let mut t = Tree::new(&Limits::default());
        for d in ["d", "l"] {
            t.apply(0, dir(d)).unwrap();
            t.apply(0, file(&format!("{d}/old"), 1)).unwrap();
        }
        // The upper layer fills both directories, then marks `d` opaque and whites out `l` (a
        // lower directory it keeps because it wrote into it) again and again.
        for i in 0..N {
            t.apply(1, file(&format!("d/f{i}"), 10 + i)).unwrap();
            t.apply(1, file(&format!("l/f{i}"), 10 + N + i)).unwrap();
        }
        let start = std::time::Instant::now();
        for _ in 0..N {
            t.apply(1, opq("d")).unwrap();
            t.apply(1, wh("l")).unwrap();
        }
        let took = start.elapsed();
        assert!(
            took < std::time::Duration::from_secs(2),
            "{N} opaque markers and whiteouts took {took:?}"
        );
        let stats = t.stats();
        assert_eq!((stats.dirs, stats.files), (3, 2 * N));
        let mut freed = t.take_freed();
        freed.sort();
        assert_eq!(freed, [1, 1]);
    }

    #[test]
    fn whiteout_walks_are_charged_to_the_image_step_budget() {
        let mut t = Tree::new(&Limits::default());
        for i in 0..1000 {
            t.apply(0, file(&format!("d/f{i}"), i)).unwrap();
        }
        // Resolving `d` is a step or two; hiding its 1,000 files and the directory is 2,000.
        t.max_steps = t.steps + 500;
        let err = t.apply(1, wh("d")).unwrap_err();
        assert!(
            matches!(err.kind, TreeErrorKind::WorkBudget { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("steps to apply (limit)"), "{err}");
    }

    #[test]
    fn hardlinks_cannot_grow_an_inodes_xattrs_past_ext4s_block() {
        let x = |name: &str, len: usize| Xattr {
            name: name.as_bytes().into(),
            value: vec![b'v'; len].into(),
        };
        let mut f = file("f", 1);
        f.xattrs = vec![x("user.a", 2000)];
        // The same name replaces the value: 3,024 bytes in all.
        let mut g = hard("g", "f");
        g.xattrs = vec![x("user.a", 3000)];
        let mut t = build(vec![vec![f, g]]);
        assert_eq!(xattr_space(&t.inode(0).xattrs), 3024);
        // Another name would need 3,024 + 2,024 bytes.
        let mut h = hard("h", "f");
        h.xattrs = vec![x("user.b", 2000)];
        let err = t.apply(0, h).unwrap_err();
        assert!(
            matches!(
                err.kind,
                TreeErrorKind::XattrsTooLarge {
                    len: 5048,
                    max: 4060
                }
            ),
            "{err}"
        );
        assert_eq!(err.path, "/h");
    }

    #[test]
    fn stats_count_each_inode_once() {
        let t = build(vec![vec![
            dir("d"),
            e(
                "d/f",
                EntryKind::File(Content::Staged { id: 1, size: 5000 }),
            ),
            hard("d/g", "d/f"),
            sym("s", &"t".repeat(70)),
            e("n", EntryKind::Fifo),
        ]]);
        let s = t.stats();
        assert_eq!(
            (s.dirs, s.inodes, s.files, s.content_bytes),
            (2, 3, 1, 5000)
        );
        // 2 data blocks, 1 long-symlink block, 1 block per directory.
        assert_eq!(s.blocks, 2 + 1 + 2);
    }
}
