//! The operator's commands besides `serve`: join tokens, API tokens,
//! operator certificates, the fleet view and node revocation. Each works on
//! the data dir directly (SQLite WAL) or on the PostgreSQL store
//! (`--database-url`), so it works while `serve` runs.

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;

use slipway_proto::view;

use crate::auth::{apitoken, operator, token};
use crate::backup;
use crate::cli::{BackupArgs, RestoreArgs, TokenApiArgs, TokenCreateArgs};
use crate::cli::{
    ListArgs, MetricsArgs, NodeRevokeArgs, NodesArgs, OperatorCreateArgs, RevokeArgs,
};
use crate::error::Error;
use crate::fleet;
use crate::pki::ca::Ca;
use crate::store::{PostgresUrl, Store};

/// `token create`: prints a one-time join token.
pub async fn token_create(args: TokenCreateArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let ttl = token::parse_ttl(&args.ttl)?;
    for tag in &args.tags {
        token::check_tag(tag)?;
    }
    let ca = load_ca(&args.data_dir)?;
    let store = open_store(&args.data_dir, db).await?;
    let token = token::create(
        &store,
        &ca.fingerprint(),
        ttl,
        &args.tags,
        crate::now_unix(),
    )
    .await?;
    println!("{token}");
    Ok(())
}

/// `token api`: prints a new API token.
pub async fn token_api(args: TokenApiArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let scopes = apitoken::parse_scopes(&args.scopes)?;
    let store = open_store(&args.data_dir, db).await?;
    println!(
        "{}",
        apitoken::create(&store, &scopes, crate::now_unix()).await?
    );
    Ok(())
}

/// `token list`: API tokens, as a table or JSON.
pub async fn token_list(args: ListArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let tokens = open_store(&args.data_dir, db).await?.api_tokens().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tokens)?);
        return Ok(());
    }
    println!("{:<18} {:<21} {:<21} SCOPES", "ID", "CREATED", "REVOKED");
    for t in tokens {
        println!(
            "{:<18} {:<21} {:<21} {}",
            t.id,
            when(Some(t.created_at)),
            when(t.revoked_at),
            t.scopes.join(",")
        );
    }
    Ok(())
}

/// `token revoke`: revokes an API token by id (or its whole text).
pub async fn token_revoke(args: RevokeArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let store = open_store(&args.data_dir, db).await?;
    let (id, newly) = apitoken::revoke(&store, args.id.trim(), crate::now_unix()).await?;
    print_revoked("API token", &id, newly);
    Ok(())
}

/// `operator create`: issues an operator certificate and writes it (and
/// the key made here, unless `--csr`) into `--out`.
pub async fn operator_create(
    args: OperatorCreateArgs,
    db: Option<&PostgresUrl>,
) -> Result<(), Error> {
    let scopes = apitoken::parse_scopes(&args.scopes).map_err(operator::OperatorError::from)?;
    let validity = token::parse_ttl(&args.ttl)?;
    let csr = args
        .csr
        .as_deref()
        .map(|path| {
            std::fs::read_to_string(path).map_err(|source| Error::File {
                what: "reading the CSR",
                path: path.to_owned(),
                source,
            })
        })
        .transpose()?;
    // Checked before anything is issued, so a bad name leaves no record.
    if !apitoken::is_app_name(&args.name) {
        return Err(operator::OperatorError::Name(args.name).into());
    }
    let cert_path = args.out.join(format!("{}.pem", args.name));
    let key_path = args.out.join(format!("{}.key", args.name));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(Error::Exists(path.clone()));
        }
    }
    // 0700 whatever the umask: the directory holds a private key.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.out)
        .map_err(|source| Error::File {
            what: "creating",
            path: args.out.clone(),
            source,
        })?;
    let ca = load_ca(&args.data_dir)?;
    let store = open_store(&args.data_dir, db).await?;
    let issued = operator::create(
        &store,
        &ca,
        &args.name,
        &scopes,
        validity,
        csr.as_deref(),
        crate::now_unix(),
    )
    .await?;
    let key_written = issued.key_pem.as_ref().map_or(Ok(false), |key| {
        write_new(&key_path, key, 0o600).map(|()| true)
    });
    let written = key_written.and_then(|key_written| {
        write_new(&cert_path, &issued.cert_pem, 0o644).inspect_err(|_| {
            if key_written {
                let _ = std::fs::remove_file(&key_path);
            }
        })
    });
    if let Err(err) = written {
        // Nobody holds a usable copy: do not leave a live certificate behind.
        operator::revoke(&store, &issued.operator.id, crate::now_unix()).await?;
        return Err(Error::Unwritten {
            id: issued.operator.id,
            source: Box::new(err),
        });
    }
    println!(
        "operator {} ({}), scopes {}, valid until {}",
        issued.operator.id,
        issued.operator.name,
        issued.operator.scopes.join(","),
        when(Some(issued.operator.expires_at))
    );
    println!("certificate: {}", cert_path.display());
    if issued.key_pem.is_some() {
        println!("key:         {}", key_path.display());
    }
    Ok(())
}

/// `operator list`: operator certificates, as a table or JSON.
pub async fn operator_list(args: ListArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let operators = open_store(&args.data_dir, db).await?.operators().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&operators)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<16} {:<21} {:<21} SCOPES",
        "ID", "NAME", "EXPIRES", "REVOKED"
    );
    for o in operators {
        println!(
            "{:<20} {:<16} {:<21} {:<21} {}",
            o.id,
            o.name,
            when(Some(o.expires_at)),
            when(o.revoked_at),
            o.scopes.join(",")
        );
    }
    Ok(())
}

/// `operator revoke`: revokes an operator certificate by id or name.
pub async fn operator_revoke(args: RevokeArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let store = open_store(&args.data_dir, db).await?;
    let (id, newly) = operator::revoke(&store, args.id.trim(), crate::now_unix()).await?;
    print_revoked("operator", &id, newly);
    Ok(())
}

/// `nodes`: the fleet view from the database, as `slipway nodes` shows it.
pub async fn nodes(args: NodesArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let store = open_store(&args.data_dir, db).await?;
    let nodes: Vec<slipway_proto::v1::NodeView> = fleet::nodes(&store, crate::now_unix())
        .await?
        .iter()
        .map(Into::into)
        .collect();
    if args.json {
        println!("{}", view::nodes_json(&nodes)?);
    } else {
        print!("{}", view::render_table(&nodes));
    }
    Ok(())
}

/// `metrics`: the fleet's metrics from the database, in the Prometheus
/// text format (no sessions or process figures: those are `serve`'s).
pub async fn metrics(args: MetricsArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let store = open_store(&args.data_dir, db).await?;
    let scraper = crate::metrics::Scraper::offline(store, &args.data_dir);
    print!("{}", scraper.render().await?);
    Ok(())
}

/// `node revoke`: revokes a node by id or unique name.
pub async fn node_revoke(args: NodeRevokeArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let store = open_store(&args.data_dir, db).await?;
    let revoked = fleet::revoke(&store, &args.node, "operator", crate::now_unix()).await?;
    print_revoked("node", &revoked.node_id, revoked.newly);
    Ok(())
}

/// `ca rotate start`: a new CA beside the current one (see
/// [`crate::pki::rotation`]); a running `serve` acts on it within seconds.
pub async fn ca_rotate_start(
    args: crate::cli::RotateStartArgs,
    db: Option<&PostgresUrl>,
) -> Result<(), Error> {
    load_ca(&args.data_dir)?;
    let store = open_store(&args.data_dir, db).await?;
    let now = crate::now_unix();
    let rotation = crate::pki::rotation::start(&args.data_dir, args.now, now)?;
    let event = crate::audit::AuditEvent::success(
        crate::audit::CA_ROTATION_STARTED,
        "slipway-controller",
        "ca",
        &rotation.new_ca_sha256,
        serde_json::json!({
            "old_ca_sha256": rotation.old_ca_sha256,
            "new_ca_sha256": rotation.new_ca_sha256,
            "renew_now": rotation.renew_now,
        }),
    );
    store.audit(&event, now).await?;
    println!(
        "CA rotation started: new CA sha256 {} trusted beside {}; agents get it within seconds \
         and renew onto it {}. Finish with `slipway-controller ca rotate finish` once \
         `slipway status` shows no node on the old CA.",
        rotation.new_ca_sha256,
        rotation.old_ca_sha256,
        if rotation.renew_now {
            "at once"
        } else {
            "at their next renewal"
        }
    );
    Ok(())
}

/// `ca rotate finish`: the new CA becomes the only one; refused while live
/// nodes are still on the old one, unless `--force`.
pub async fn ca_rotate_finish(
    args: crate::cli::RotateFinishArgs,
    db: Option<&PostgresUrl>,
) -> Result<(), Error> {
    load_ca(&args.data_dir)?;
    let store = open_store(&args.data_dir, db).await?;
    let rotation = crate::pki::rotation::current(&args.data_dir)?
        .ok_or(crate::pki::rotation::RotationError::NotStarted)?;
    let lagging = fleet::certs::nodes_on_old_ca(&store, &rotation).await?;
    if !lagging.is_empty() && !args.force {
        return Err(Error::Lagging(lagging));
    }
    let rotation = crate::pki::rotation::finish(&args.data_dir)?;
    let event = crate::audit::AuditEvent::success(
        crate::audit::CA_ROTATION_FINISHED,
        "slipway-controller",
        "ca",
        &rotation.new_ca_sha256,
        serde_json::json!({
            "old_ca_sha256": rotation.old_ca_sha256,
            "new_ca_sha256": rotation.new_ca_sha256,
            "left_on_old_ca": lagging,
        }),
    );
    store.audit(&event, crate::now_unix()).await?;
    println!(
        "CA rotation finished: only CA sha256 {} is trusted; certificates of the old CA are \
         refused (operators made before the rotation need new ones){}",
        rotation.new_ca_sha256,
        if lagging.is_empty() {
            String::new()
        } else {
            format!(
                "; still on the old CA (re-enroll with --replace): {}",
                lagging.join(", ")
            )
        }
    );
    Ok(())
}

async fn open_store(data_dir: &Path, db: Option<&PostgresUrl>) -> Result<Store, Error> {
    Store::open_at(data_dir, db).await.map_err(Error::OpenStore)
}

fn load_ca(data_dir: &Path) -> Result<Ca, Error> {
    Ca::load_or_create(data_dir).map_err(Error::LoadCa)
}

/// A unix time as `YYYY-MM-DDTHH:MM:SSZ`, or "-" for none.
fn when(unix: Option<i64>) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    unix.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| "-".to_owned())
}

fn print_revoked(what: &str, id: &str, newly: bool) {
    if newly {
        println!("revoked {what} {id}");
    } else {
        println!("{what} {id} was already revoked");
    }
}

/// Writes a file that must not exist yet, with `mode`, synced.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), Error> {
    use std::io::Write as _;
    let file_error = |what| {
        move |source| Error::File {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(file_error("creating"))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(file_error("writing"))
}

/// `backup`: an encrypted backup of the data dir, made while `serve` may
/// run (the database is snapshot with `VACUUM INTO`).
pub async fn backup(args: BackupArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let key = backup::Key::from_flags(
        args.passphrase_file.as_deref(),
        args.recipient.as_deref(),
        None,
    )?;
    if let Some(url) = db {
        return Err(backup::BackupError::Usage(format!(
            "the store is PostgreSQL ({url}): `backup` covers the SQLite store in the data \
             dir only; back up the database with pg_dump and the data dir (CA, keys, \
             secrets.key) with your file backups"
        ))
        .into());
    }
    if !args.data_dir.join(crate::pki::ca::CA_KEY_FILE).exists() {
        return Err(backup::BackupError::Usage(format!(
            "{} holds no controller CA: is it the data dir `serve` uses?",
            args.data_dir.display()
        ))
        .into());
    }
    let store = Store::open(&args.data_dir)
        .await
        .map_err(Error::OpenStore)?;
    let report = backup::backup(&store, &args.data_dir, &args.out, &key).await?;
    let audit = crate::audit::AuditEvent::success(
        crate::audit::BACKUP_CREATED,
        "operator",
        "backup",
        report.path.display().to_string(),
        serde_json::json!({ "size": report.size, "db_size": report.db_size }),
    );
    store.audit(&audit, crate::now_unix()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "wrote {} ({} bytes; database {} bytes; CA sha256 {})",
            report.path.display(),
            report.size,
            report.db_size,
            report.ca_sha256
        );
    }
    Ok(())
}

/// `restore`: a new data dir from a backup.
pub async fn restore(args: RestoreArgs, db: Option<&PostgresUrl>) -> Result<(), Error> {
    let key = backup::Key::from_flags(
        args.passphrase_file.as_deref(),
        None,
        args.identity.as_deref(),
    )?;
    if let Some(url) = db {
        return Err(backup::BackupError::Usage(format!(
            "the store is PostgreSQL ({url}): `restore` makes a data dir with a SQLite \
             store; restore a PostgreSQL database with pg_restore"
        ))
        .into());
    }
    let report = backup::restore(&args.from, &args.data_dir, &key).await?;
    println!(
        "restored the backup of {} into {} (CA sha256 {}); start it with \
         `slipway-controller serve --data-dir {}` on the address the agents use",
        report.created_at,
        report.data_dir.display(),
        report.ca_sha256,
        report.data_dir.display()
    );
    Ok(())
}
