//! `banger image ...` and `banger kernel ...`: thin wrappers that send requests, draw progress
//! and print tables or JSON. Paths given by the user are made absolute here, because the daemon
//! runs in another working directory.

use std::process::ExitCode;

use banger_api::{
    BuildImageRequest, Deleted, ExportImageRequest, ExportResult, ImageInfo, KernelInfo, Pruned,
    PullImageRequest, PullKernelRequest, RegisterImageRequest, RegisterKernelRequest,
};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::Client;
use crate::exit::CliError;
use crate::render::{human_bytes, human_duration, table, Renderer};
use crate::{absolute, Ctx, ImageCmd, KernelCmd};

/// Runs a streamed operation with a progress display and the total time at the end.
async fn streamed<T: DeserializeOwned>(
    ctx: &Ctx,
    client: &Client,
    path: &str,
    body: &impl Serialize,
    what: &str,
) -> Result<T, CliError> {
    let mut renderer = Renderer::new(ctx.verbose);
    let result = client.stream(path, body, |e| renderer.event(e)).await;
    let took = renderer.finish();
    if result.is_ok() {
        eprintln!("{what} in {}", human_duration(took));
    }
    result
}

/// Where an image came from, for the list: an OCI image's reference and short manifest digest.
fn origin(i: &ImageInfo) -> String {
    match &i.oci {
        Some(o) => {
            let short = o.digest.get(..19).unwrap_or(&o.digest);
            format!("{}@{short}", o.reference)
        }
        None => i.origin.clone(),
    }
}

pub(crate) fn created_short(rfc3339: &str) -> String {
    rfc3339.get(..16).unwrap_or(rfc3339).replace('T', " ")
}

pub async fn image(ctx: &Ctx, cmd: ImageCmd) -> Result<ExitCode, CliError> {
    let client = Client::connect(&ctx.paths).await?;
    match cmd {
        ImageCmd::List(f) => {
            let images: Vec<ImageInfo> =
                client.call(Method::GET, "/v1/images", None::<&()>).await?;
            if f.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&images).unwrap_or_default()
                );
            } else if images.is_empty() {
                eprintln!("no images yet; build one with `banger image build debian-bookworm`");
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.source.to_string(),
                            human_bytes(i.size_bytes),
                            match i.snapshot_bytes {
                                0 => "-".to_owned(),
                                n => human_bytes(n),
                            },
                            i.kernel.clone(),
                            created_short(&i.created_at),
                            origin(i),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "NAME",
                            "SOURCE",
                            "SIZE",
                            "SNAPSHOTS",
                            "KERNEL",
                            "CREATED",
                            "ORIGIN"
                        ],
                        &rows
                    )
                );
            }
        }
        ImageCmd::Build { recipe, name } => {
            let req = BuildImageRequest {
                recipe,
                name,
                force: false,
            };
            let img: ImageInfo = streamed(ctx, &client, "/v1/images/build", &req, "built").await?;
            println!("{}", img.name);
            eprintln!(
                "image {} ({}) with kernel {}",
                img.name,
                human_bytes(img.size_bytes),
                img.kernel
            );
        }
        ImageCmd::Pull {
            reference,
            name,
            json,
        } => {
            // A bundle manifest given as a relative path is resolved here: the daemon runs elsewhere.
            let reference = if reference.starts_with("./") || reference.starts_with("../") {
                absolute(std::path::Path::new(&reference))?
                    .display()
                    .to_string()
            } else {
                reference
            };
            let req = PullImageRequest { reference, name };
            if json {
                let img: ImageInfo = client
                    .stream("/v1/images/pull", &req, |e| {
                        println!("{}", serde_json::to_string(e).unwrap_or_default())
                    })
                    .await?;
                let done = banger_api::Event::Done {
                    result: serde_json::to_value(&img).unwrap_or_default(),
                };
                println!("{}", serde_json::to_string(&done).unwrap_or_default());
            } else {
                let img: ImageInfo =
                    streamed(ctx, &client, "/v1/images/pull", &req, "pulled").await?;
                println!("{}", img.name);
                if let Some(o) = &img.oci {
                    eprintln!(
                        "image {} ({}) from {}@{}",
                        img.name,
                        human_bytes(img.size_bytes),
                        o.reference,
                        o.digest
                    );
                }
            }
        }
        ImageCmd::Export { name, output } => {
            let req = ExportImageRequest {
                name,
                out_dir: absolute(&output)?.display().to_string(),
            };
            let res: ExportResult =
                streamed(ctx, &client, "/v1/images/export", &req, "exported").await?;
            println!("{}", res.manifest);
        }
        ImageCmd::Register {
            name,
            rootfs,
            kernel,
            initrd,
        } => {
            let req = RegisterImageRequest {
                name,
                rootfs: absolute(&rootfs)?.display().to_string(),
                kernel: absolute(&kernel)?.display().to_string(),
                initrd: initrd
                    .map(|p| absolute(&p).map(|p| p.display().to_string()))
                    .transpose()?,
            };
            let img: ImageInfo =
                streamed(ctx, &client, "/v1/images/register", &req, "registered").await?;
            println!("{}", img.name);
        }
        ImageCmd::Delete { name } => {
            let d: Deleted = client
                .call(Method::DELETE, &format!("/v1/images/{name}"), None::<&()>)
                .await?;
            eprintln!("deleted image {}", d.name);
        }
        ImageCmd::Prune => {
            let p: Pruned = client
                .call(Method::POST, "/v1/images/prune", None::<&()>)
                .await?;
            eprintln!("freed {} of cached layers", human_bytes(p.freed_bytes));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn kernel(ctx: &Ctx, cmd: KernelCmd) -> Result<ExitCode, CliError> {
    let client = Client::connect(&ctx.paths).await?;
    match cmd {
        KernelCmd::List(f) => {
            let kernels: Vec<KernelInfo> =
                client.call(Method::GET, "/v1/kernels", None::<&()>).await?;
            if f.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&kernels).unwrap_or_default()
                );
            } else if kernels.is_empty() {
                eprintln!("no kernels yet; building or pulling an image brings its kernel");
            } else {
                let rows: Vec<Vec<String>> = kernels
                    .iter()
                    .map(|k| {
                        vec![
                            k.name.clone(),
                            k.source.to_string(),
                            if k.initrd.is_some() { "yes" } else { "no" }.to_owned(),
                            created_short(&k.created_at),
                        ]
                    })
                    .collect();
                print!("{}", table(&["NAME", "SOURCE", "INITRD", "CREATED"], &rows));
            }
        }
        KernelCmd::Pull { reference, name } => {
            let req = PullKernelRequest { reference, name };
            let k: KernelInfo = streamed(ctx, &client, "/v1/kernels/pull", &req, "pulled").await?;
            println!("{}", k.name);
        }
        KernelCmd::Register {
            name,
            kernel,
            initrd,
        } => {
            let req = RegisterKernelRequest {
                name,
                kernel: absolute(&kernel)?.display().to_string(),
                initrd: initrd
                    .map(|p| absolute(&p).map(|p| p.display().to_string()))
                    .transpose()?,
            };
            let k: KernelInfo = client
                .call(Method::POST, "/v1/kernels/register", Some(&req))
                .await?;
            println!("{}", k.name);
        }
        KernelCmd::Delete { name } => {
            let d: Deleted = client
                .call(Method::DELETE, &format!("/v1/kernels/{name}"), None::<&()>)
                .await?;
            eprintln!("deleted kernel {}", d.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
