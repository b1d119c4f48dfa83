//! The daemon's database: one SQLite file with numbered migrations.
//!
//! The schema version lives in `PRAGMA user_version`; [`MIGRATIONS`] is append-only and each
//! entry runs in its own transaction, so a crash mid-upgrade leaves the previous version intact.
//! Rows are written only after the files they describe are complete and in place (the services
//! see to that); this module owns SQL and nothing about files. Calls are synchronous and short;
//! async callers go through [`Store::call`], which moves them off the runtime threads.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use banger_api::vm::{VmSpec, VmState};
use banger_api::{Boot, ImageInfo, KernelInfo, OciOrigin, Source};
use rusqlite::{params, Connection, OptionalExtension, Row};

/// Append-only list of schema steps; index + 1 is the resulting `user_version`.
const MIGRATIONS: &[&str] = &[
    // 1: images and kernels.
    "CREATE TABLE kernels (
        name          TEXT PRIMARY KEY,
        source        TEXT NOT NULL,
        kernel_path   TEXT NOT NULL,
        kernel_sha256 TEXT NOT NULL,
        initrd_path   TEXT,
        initrd_sha256 TEXT,
        created_at    TEXT NOT NULL
    );
    CREATE TABLE images (
        name          TEXT PRIMARY KEY,
        source        TEXT NOT NULL,
        origin        TEXT NOT NULL,
        rootfs_path   TEXT NOT NULL,
        rootfs_sha256 TEXT NOT NULL,
        size_bytes    INTEGER NOT NULL,
        kernel        TEXT NOT NULL REFERENCES kernels(name),
        created_at    TEXT NOT NULL
    );",
    // 2: VMs. The ip column is the lease: UNIQUE makes a double allocation impossible.
    "CREATE TABLE vms (
        name        TEXT PRIMARY KEY,
        id          TEXT NOT NULL UNIQUE,
        image       TEXT NOT NULL,
        kernel      TEXT NOT NULL,
        state       TEXT NOT NULL,
        vcpu        INTEGER NOT NULL,
        memory_mib  INTEGER NOT NULL,
        disk_bytes  INTEGER NOT NULL,
        ip          TEXT NOT NULL UNIQUE,
        mac         TEXT NOT NULL,
        tap         TEXT NOT NULL,
        vmm         TEXT,
        handle      TEXT,
        created_at  TEXT NOT NULL,
        last_error  TEXT
    );",
    // 3: OCI images. `boot` says how an image starts; `oci_runtime` is the image config's
    // Env/WorkingDir/User (JSON) handed to the agent; image_blobs lists the cached blobs an
    // image was made from, so the cache can drop what no image needs.
    "ALTER TABLE images ADD COLUMN boot TEXT NOT NULL DEFAULT 'systemd';
    ALTER TABLE images ADD COLUMN oci_reference TEXT;
    ALTER TABLE images ADD COLUMN oci_digest TEXT;
    ALTER TABLE images ADD COLUMN oci_runtime TEXT;
    CREATE TABLE image_blobs (
        image  TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
        digest TEXT NOT NULL,
        PRIMARY KEY (image, digest)
    );",
    // 4: how each VM boots, fixed when it is made (a re-pulled image may change, the VM not).
    "ALTER TABLE vms ADD COLUMN boot TEXT NOT NULL DEFAULT 'systemd';",
    // 5: whether the VM may reach services on the host (`--host-access`), fixed when it is made.
    "ALTER TABLE vms ADD COLUMN host_access INTEGER NOT NULL DEFAULT 0;",
    // 6: the VM's own egress flags (`--allow-host`, one name per line; `--no-network`), fixed
    // when it is made; the config's `[network] egress` is combined with them at each start.
    "ALTER TABLE vms ADD COLUMN allow_hosts TEXT NOT NULL DEFAULT '';
    ALTER TABLE vms ADD COLUMN no_network INTEGER NOT NULL DEFAULT 0;",
    // 7: snapshots of running VMs (memory, devices and disks, in STATE/snapshots/NAME/). The
    // row is written once the files are whole, so a row always names a usable snapshot.
    "CREATE TABLE snapshots (
        name        TEXT PRIMARY KEY,
        vm          TEXT NOT NULL,
        image       TEXT NOT NULL,
        kernel      TEXT NOT NULL,
        boot        TEXT NOT NULL,
        vmm         TEXT NOT NULL,
        vcpu        INTEGER NOT NULL,
        memory_mib  INTEGER NOT NULL,
        disk_bytes  INTEGER NOT NULL,
        bytes       INTEGER NOT NULL,
        created_at  TEXT NOT NULL
    );",
    // 8: warm snapshots (kept by banger of a freshly booted VM, restored instead of booting):
    // what they were made from, as JSON (`vms::warm::WarmKey`); NULL for a user's snapshot.
    "ALTER TABLE snapshots ADD COLUMN warm_key TEXT;",
];

/// Every column of `images`, plus the bytes its snapshots hold.
const IMAGE_COLUMNS: &str = "images.*, (SELECT COALESCE(SUM(s.bytes), 0) FROM snapshots s
                                       WHERE s.image = images.name) AS snapshot_bytes";

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut conn = Connection::open(path)
            .with_context(|| format!("cannot open the database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn).with_context(|| format!("cannot migrate {}", path.display()))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| anyhow::anyhow!("database lock poisoned by an earlier panic"))?;
            f(&mut guard)
        })
        .await
        .context("database task failed")?
    }
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let current = usize::try_from(current).unwrap_or(0);
    if current > MIGRATIONS.len() {
        anyhow::bail!(
            "database schema version {current} is newer than this bangerd knows ({}); upgrade banger",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("migration {}", i + 1))?;
        tx.pragma_update(None, "user_version", i64::try_from(i + 1)?)?;
        tx.commit()?;
    }
    Ok(())
}

fn source_str(s: &Source) -> &'static str {
    match s {
        Source::Built => "built",
        Source::Pulled => "pulled",
        Source::Registered => "registered",
        Source::Oci => "oci",
    }
}

fn parse_source(s: &str) -> Source {
    match s {
        "built" => Source::Built,
        "pulled" => Source::Pulled,
        "oci" => Source::Oci,
        _ => Source::Registered,
    }
}

fn image_row(r: &Row<'_>) -> rusqlite::Result<ImageInfo> {
    let size: i64 = r.get("size_bytes")?;
    Ok(ImageInfo {
        name: r.get("name")?,
        source: parse_source(&r.get::<_, String>("source")?),
        origin: r.get("origin")?,
        rootfs: r.get("rootfs_path")?,
        // Stored as "" when there is none (the column predates OCI images).
        rootfs_sha256: Some(r.get::<_, String>("rootfs_sha256")?).filter(|s| !s.is_empty()),
        size_bytes: u64::try_from(size).unwrap_or(0),
        kernel: r.get("kernel")?,
        created_at: r.get("created_at")?,
        boot: parse_boot(&r.get::<_, String>("boot")?),
        oci: match (
            r.get::<_, Option<String>>("oci_reference")?,
            r.get::<_, Option<String>>("oci_digest")?,
        ) {
            (Some(reference), Some(digest)) => Some(OciOrigin { reference, digest }),
            _ => None,
        },
        snapshot_bytes: u64::try_from(r.get::<_, i64>("snapshot_bytes")?).unwrap_or(0),
    })
}

fn kernel_row(r: &Row<'_>) -> rusqlite::Result<KernelInfo> {
    Ok(KernelInfo {
        name: r.get("name")?,
        source: parse_source(&r.get::<_, String>("source")?),
        kernel: r.get("kernel_path")?,
        kernel_sha256: r.get("kernel_sha256")?,
        initrd: r.get("initrd_path")?,
        initrd_sha256: r.get("initrd_sha256")?,
        created_at: r.get("created_at")?,
    })
}

pub fn list_images(conn: &Connection) -> anyhow::Result<Vec<ImageInfo>> {
    let mut stmt = conn.prepare(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"))?;
    let rows = stmt.query_map([], image_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn get_image(conn: &Connection, name: &str) -> anyhow::Result<Option<ImageInfo>> {
    Ok(conn
        .query_row(
            &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"),
            [name],
            image_row,
        )
        .optional()?)
}

pub fn list_kernels(conn: &Connection) -> anyhow::Result<Vec<KernelInfo>> {
    let mut stmt = conn.prepare("SELECT * FROM kernels ORDER BY name")?;
    let rows = stmt.query_map([], kernel_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn get_kernel(conn: &Connection, name: &str) -> anyhow::Result<Option<KernelInfo>> {
    Ok(conn
        .query_row("SELECT * FROM kernels WHERE name = ?1", [name], kernel_row)
        .optional()?)
}

pub fn insert_kernel(conn: &Connection, k: &KernelInfo) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO kernels (name, source, kernel_path, kernel_sha256, initrd_path, initrd_sha256, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            k.name,
            source_str(&k.source),
            k.kernel,
            k.kernel_sha256,
            k.initrd,
            k.initrd_sha256,
            k.created_at
        ],
    )?;
    Ok(())
}

/// Points an existing kernel row at new files (a newer version of the same kernel).
pub fn update_kernel_files(conn: &Connection, k: &KernelInfo) -> anyhow::Result<()> {
    let n = conn.execute(
        "UPDATE kernels SET kernel_path = ?2, kernel_sha256 = ?3, initrd_path = ?4,
                            initrd_sha256 = ?5, created_at = ?6 WHERE name = ?1",
        params![
            k.name,
            k.kernel,
            k.kernel_sha256,
            k.initrd,
            k.initrd_sha256,
            k.created_at
        ],
    )?;
    anyhow::ensure!(n == 1, "kernel {:?} is not in the store", k.name);
    Ok(())
}

pub fn insert_image(conn: &Connection, i: &ImageInfo) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO images (name, source, origin, rootfs_path, rootfs_sha256, size_bytes, kernel,
                             created_at, boot, oci_reference, oci_digest)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            i.name,
            source_str(&i.source),
            i.origin,
            i.rootfs,
            i.rootfs_sha256.as_deref().unwrap_or(""),
            i64::try_from(i.size_bytes).unwrap_or(i64::MAX),
            i.kernel,
            i.created_at,
            i.boot.as_str(),
            i.oci.as_ref().map(|o| &o.reference),
            i.oci.as_ref().map(|o| &o.digest),
        ],
    )?;
    Ok(())
}

/// Records what an OCI image needs besides its row: the runtime settings for its agent and the
/// cached blobs it was made from. Call in the transaction that inserts the image.
pub fn set_oci_details(
    conn: &Connection,
    image: &str,
    runtime_json: &str,
    blobs: &[String],
) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE images SET oci_runtime = ?2 WHERE name = ?1",
        params![image, runtime_json],
    )?;
    let mut stmt =
        conn.prepare("INSERT OR IGNORE INTO image_blobs (image, digest) VALUES (?1, ?2)")?;
    for b in blobs {
        stmt.execute(params![image, b])?;
    }
    Ok(())
}

/// The runtime settings (JSON) of an OCI image; None for other images.
pub fn image_runtime(conn: &Connection, image: &str) -> anyhow::Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT oci_runtime FROM images WHERE name = ?1",
            [image],
            |r| r.get::<_, Option<String>>(0),
        )
        .optional()?
        .flatten())
}

/// Every blob digest some image still needs (the rest of the OCI cache is garbage).
pub fn blobs_in_use(conn: &Connection) -> anyhow::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT DISTINCT digest FROM image_blobs ORDER BY digest")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Images pulled from `reference` (normalised), newest first.
pub fn images_from_reference(conn: &Connection, reference: &str) -> anyhow::Result<Vec<ImageInfo>> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images WHERE oci_reference = ?1 ORDER BY created_at DESC, name"
        ))?;
    let rows = stmt.query_map([reference], image_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn delete_image(conn: &Connection, name: &str) -> anyhow::Result<bool> {
    Ok(conn.execute("DELETE FROM images WHERE name = ?1", [name])? > 0)
}

pub fn delete_kernel(conn: &Connection, name: &str) -> anyhow::Result<bool> {
    Ok(conn.execute("DELETE FROM kernels WHERE name = ?1", [name])? > 0)
}

/// Images that boot with `kernel` (a kernel in use cannot be deleted).
pub fn images_using_kernel(conn: &Connection, kernel: &str) -> anyhow::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM images WHERE kernel = ?1 ORDER BY name")?;
    let rows = stmt.query_map([kernel], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A VM as stored. `handle` is the serialised `banger_vmm::VmHandle` of the running VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRow {
    pub name: String,
    pub id: String,
    pub image: String,
    pub kernel: String,
    pub state: VmState,
    pub spec: VmSpec,
    pub ip: String,
    pub mac: String,
    pub tap: String,
    pub vmm: Option<String>,
    pub handle: Option<String>,
    pub created_at: String,
    pub last_error: Option<String>,
    pub boot: Boot,
    /// The guest may reach every service on the host, not only DNS.
    pub host_access: bool,
    /// Names given with `--allow-host`.
    pub allow_hosts: Vec<banger_net::HostPattern>,
    /// `--no-network`.
    pub no_network: bool,
}

fn parse_boot(s: &str) -> Boot {
    match s {
        "agent" => Boot::Agent,
        _ => Boot::Systemd,
    }
}

fn vm_row(r: &Row<'_>) -> rusqlite::Result<VmRow> {
    let state: String = r.get("state")?;
    Ok(VmRow {
        name: r.get("name")?,
        id: r.get("id")?,
        image: r.get("image")?,
        kernel: r.get("kernel")?,
        state: VmState::parse(&state).unwrap_or(VmState::Failed),
        spec: VmSpec {
            vcpu: r.get("vcpu")?,
            memory_mib: r.get("memory_mib")?,
            disk_bytes: u64::try_from(r.get::<_, i64>("disk_bytes")?).unwrap_or(0),
        },
        ip: r.get("ip")?,
        mac: r.get("mac")?,
        tap: r.get("tap")?,
        vmm: r.get("vmm")?,
        handle: r.get("handle")?,
        created_at: r.get("created_at")?,
        last_error: r.get("last_error")?,
        boot: parse_boot(&r.get::<_, String>("boot")?),
        host_access: r.get("host_access")?,
        allow_hosts: parse_allow_hosts(&r.get::<_, String>("allow_hosts")?)?,
        no_network: r.get("no_network")?,
    })
}

/// The stored `--allow-host` names. They were checked when written; one that no longer parses
/// makes the row unreadable rather than quietly widen the VM's egress.
fn parse_allow_hosts(text: &str) -> rusqlite::Result<Vec<banger_net::HostPattern>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            banger_net::HostPattern::parse(l).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })
        })
        .collect()
}

pub fn list_vms(conn: &Connection) -> anyhow::Result<Vec<VmRow>> {
    let mut stmt = conn.prepare("SELECT * FROM vms ORDER BY name")?;
    let rows = stmt.query_map([], vm_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn get_vm(conn: &Connection, name: &str) -> anyhow::Result<Option<VmRow>> {
    Ok(conn
        .query_row("SELECT * FROM vms WHERE name = ?1", [name], vm_row)
        .optional()?)
}

pub fn insert_vm(conn: &Connection, v: &VmRow) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO vms (name, id, image, kernel, state, vcpu, memory_mib, disk_bytes, ip, mac, tap,
                          vmm, handle, created_at, last_error, boot, host_access, allow_hosts,
                          no_network)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                 ?19)",
        params![
            v.name,
            v.id,
            v.image,
            v.kernel,
            v.state.as_str(),
            v.spec.vcpu,
            v.spec.memory_mib,
            i64::try_from(v.spec.disk_bytes).unwrap_or(i64::MAX),
            v.ip,
            v.mac,
            v.tap,
            v.vmm,
            v.handle,
            v.created_at,
            v.last_error,
            v.boot.as_str(),
            v.host_access,
            v.allow_hosts
                .iter()
                .map(|p| format!("{p}\n"))
                .collect::<String>(),
            v.no_network
        ],
    )?;
    Ok(())
}

/// Records a state change together with the VMM handle it implies (None when not running).
pub fn set_vm_state(
    conn: &Connection,
    name: &str,
    state: VmState,
    vmm: Option<&str>,
    handle: Option<&str>,
    last_error: Option<&str>,
) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE vms SET state = ?2, vmm = COALESCE(?3, vmm), handle = ?4, last_error = ?5 WHERE name = ?1",
        params![name, state.as_str(), vmm, handle, last_error],
    )?;
    Ok(())
}

pub fn delete_vm(conn: &Connection, name: &str) -> anyhow::Result<bool> {
    Ok(conn.execute("DELETE FROM vms WHERE name = ?1", [name])? > 0)
}

/// VMs made from `image` (an image in use cannot be deleted).
pub fn vms_using_image(conn: &Connection, image: &str) -> anyhow::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM vms WHERE image = ?1 ORDER BY name")?;
    let rows = stmt.query_map([image], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A snapshot as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub name: String,
    pub vm: String,
    pub image: String,
    pub kernel: String,
    pub boot: Boot,
    pub vmm: String,
    pub spec: VmSpec,
    pub bytes: u64,
    pub created_at: String,
    /// What a warm snapshot was made from (JSON); `None` for a user's snapshot.
    pub warm_key: Option<String>,
}

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
    Ok(SnapshotRow {
        name: r.get("name")?,
        vm: r.get("vm")?,
        image: r.get("image")?,
        kernel: r.get("kernel")?,
        boot: parse_boot(&r.get::<_, String>("boot")?),
        vmm: r.get("vmm")?,
        spec: VmSpec {
            vcpu: r.get("vcpu")?,
            memory_mib: r.get("memory_mib")?,
            disk_bytes: u64::try_from(r.get::<_, i64>("disk_bytes")?).unwrap_or(0),
        },
        bytes: u64::try_from(r.get::<_, i64>("bytes")?).unwrap_or(0),
        created_at: r.get("created_at")?,
        warm_key: r.get("warm_key")?,
    })
}

pub fn list_snapshots(conn: &Connection) -> anyhow::Result<Vec<SnapshotRow>> {
    let mut stmt = conn.prepare("SELECT * FROM snapshots ORDER BY name")?;
    let rows = stmt.query_map([], snapshot_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn get_snapshot(conn: &Connection, name: &str) -> anyhow::Result<Option<SnapshotRow>> {
    Ok(conn
        .query_row(
            "SELECT * FROM snapshots WHERE name = ?1",
            [name],
            snapshot_row,
        )
        .optional()?)
}

pub fn insert_snapshot(conn: &Connection, s: &SnapshotRow) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO snapshots (name, vm, image, kernel, boot, vmm, vcpu, memory_mib, disk_bytes,
                                bytes, created_at, warm_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            s.name,
            s.vm,
            s.image,
            s.kernel,
            s.boot.as_str(),
            s.vmm,
            s.spec.vcpu,
            s.spec.memory_mib,
            i64::try_from(s.spec.disk_bytes).unwrap_or(i64::MAX),
            i64::try_from(s.bytes).unwrap_or(i64::MAX),
            s.created_at,
            s.warm_key
        ],
    )?;
    Ok(())
}

/// Deletes the rows of `image`'s warm snapshots; their names.
pub fn delete_warm_snapshots_of(conn: &Connection, image: &str) -> anyhow::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "DELETE FROM snapshots WHERE image = ?1 AND warm_key IS NOT NULL RETURNING name",
    )?;
    let rows = stmt.query_map([image], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes the snapshot's row; whether there was one.
pub fn delete_snapshot(conn: &Connection, name: &str) -> anyhow::Result<bool> {
    Ok(conn.execute("DELETE FROM snapshots WHERE name = ?1", [name])? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str) -> KernelInfo {
        KernelInfo {
            name: name.into(),
            source: Source::Built,
            kernel: "/k".into(),
            kernel_sha256: "aa".into(),
            initrd: None,
            initrd_sha256: None,
            created_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn migrations_are_idempotent_and_rows_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("b.db");
        let store = Store::open(&db).unwrap();
        drop(store);
        let store = Store::open(&db).unwrap();
        let conn = store.conn.lock().unwrap();
        insert_kernel(&conn, &kernel("k1")).unwrap();
        let img = ImageInfo {
            name: "i1".into(),
            source: Source::Pulled,
            origin: "http://x/manifest.json".into(),
            rootfs: "/r".into(),
            rootfs_sha256: Some("bb".into()),
            size_bytes: 5,
            kernel: "k1".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            boot: Boot::Systemd,
            oci: None,
            snapshot_bytes: 0,
        };
        insert_image(&conn, &img).unwrap();
        assert_eq!(get_image(&conn, "i1").unwrap(), Some(img));
        assert_eq!(images_using_kernel(&conn, "k1").unwrap(), vec!["i1"]);
        assert!(insert_kernel(&conn, &kernel("k1")).is_err());
        assert!(delete_image(&conn, "i1").unwrap());
        assert!(!delete_image(&conn, "i1").unwrap());
        assert_eq!(list_kernels(&conn).unwrap().len(), 1);
    }

    #[test]
    fn oci_images_keep_their_origin_runtime_and_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let mut conn = store.conn.lock().unwrap();
        insert_kernel(&conn, &kernel("generic")).unwrap();
        let oci = |name: &str| ImageInfo {
            name: name.into(),
            source: Source::Oci,
            origin: "docker.io/library/alpine:3.20".into(),
            rootfs: "/r".into(),
            rootfs_sha256: Some("bb".into()),
            size_bytes: 5,
            kernel: "generic".into(),
            created_at: format!("2026-01-0{}T00:00:00Z", name.len()),
            boot: Boot::Agent,
            oci: Some(OciOrigin {
                reference: "docker.io/library/alpine:3.20".into(),
                digest: "sha256:aa".into(),
            }),
            snapshot_bytes: 0,
        };
        let tx = conn.transaction().unwrap();
        for (name, blobs) in [
            ("a", ["sha256:1", "sha256:2"]),
            ("bb", ["sha256:2", "sha256:3"]),
        ] {
            insert_image(&tx, &oci(name)).unwrap();
            let blobs: Vec<String> = blobs.iter().map(|b| b.to_string()).collect();
            set_oci_details(&tx, name, r#"{"env":[]}"#, &blobs).unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(get_image(&conn, "a").unwrap(), Some(oci("a")));
        assert_eq!(
            image_runtime(&conn, "a").unwrap().as_deref(),
            Some(r#"{"env":[]}"#)
        );
        let by_ref = images_from_reference(&conn, "docker.io/library/alpine:3.20").unwrap();
        assert_eq!(
            by_ref.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["bb", "a"]
        );
        assert_eq!(
            blobs_in_use(&conn).unwrap(),
            ["sha256:1", "sha256:2", "sha256:3"]
        );
        // Deleting an image releases the blobs only it needed.
        delete_image(&conn, "a").unwrap();
        assert_eq!(blobs_in_use(&conn).unwrap(), ["sha256:2", "sha256:3"]);
        assert_eq!(image_runtime(&conn, "missing").unwrap(), None);
    }

    #[test]
    fn image_needs_existing_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let conn = store.conn.lock().unwrap();
        let img = ImageInfo {
            name: "i1".into(),
            source: Source::Built,
            origin: "r".into(),
            rootfs: "/r".into(),
            rootfs_sha256: Some("bb".into()),
            size_bytes: 5,
            kernel: "missing".into(),
            created_at: "t".into(),
            boot: Boot::Systemd,
            oci: None,
            snapshot_bytes: 0,
        };
        assert!(insert_image(&conn, &img).is_err());
    }
}
