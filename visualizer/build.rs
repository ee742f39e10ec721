//! Copies the chart library the page embeds, uPlot, into `$OUT_DIR/web/`, where
//! `src/page.rs` embeds it (`include_bytes!`), so that the binary serves the page offline.
//! (The hand-written page and console files in `web/` are embedded from there directly.)
//!
//! uPlot comes from the npm registry through `web/package.json` and its lockfile. When it
//! is not installed (or the lockfile is newer than the installed tree), this script runs
//! `npm ci` in `web/`. Only std: no build-dependencies.

use std::env;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{self, Command};
use std::time::SystemTime;

/// Files of the uPlot package, copied from `web/node_modules/uplot/dist/`.
const UPLOT_FILES: [&str; 2] = ["uPlot.iife.min.js", "uPlot.min.css"];
/// Inputs that make cargo run this script again.
const WATCHED: [&str; 2] = ["web/package.json", "web/package-lock.json"];

fn main() {
    for path in WATCHED {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=SCHOLIA_NPM");

    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR"));
    let web = manifest_dir.join("web");
    let out = PathBuf::from(env_var("OUT_DIR")).join("web");

    let dist = web.join("node_modules").join("uplot").join("dist");
    if needs_install(&web, &dist) {
        npm_ci(&web);
        if !dist.join(UPLOT_FILES[0]).is_file() {
            fail(&format!(
                "`npm ci` succeeded in {} but {} is still missing; check web/package.json \
                 (it must depend on `uplot` 1.6.x)",
                web.display(),
                dist.join(UPLOT_FILES[0]).display()
            ));
        }
    }

    if let Err(e) = fs::create_dir_all(&out) {
        fail(&format!("cannot create {}: {e}", out.display()));
    }
    for name in UPLOT_FILES {
        copy(&dist.join(name), &out.join(name));
    }
}

/// uPlot is missing, or the lockfile changed after the last `npm ci`/`npm install`.
fn needs_install(web: &Path, dist: &Path) -> bool {
    if UPLOT_FILES.iter().any(|f| !dist.join(f).is_file()) {
        return true;
    }
    // npm writes node_modules/.package-lock.json on every install.
    match (
        modified(&web.join("package-lock.json")),
        modified(&web.join("node_modules").join(".package-lock.json")),
    ) {
        (Some(lock), Some(installed)) => lock > installed,
        _ => false,
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn npm_ci(web: &Path) {
    let npm = env::var("SCHOLIA_NPM").unwrap_or_else(|_| {
        if cfg!(windows) {
            "npm.cmd".to_owned()
        } else {
            "npm".to_owned()
        }
    });
    println!(
        "cargo:warning=installing the page's JavaScript dependencies: `{npm} ci` in {}",
        web.display()
    );
    let status = Command::new(&npm)
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(web)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!(
            "`{npm} ci --no-audit --no-fund` failed in {} ({s}). The visualizer page needs \
             uPlot from the npm registry; run that command there by hand to see why \
             (network access to the registry is needed once).",
            web.display()
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => fail(&format!(
            "`{npm}` was not found. Building scholia-visualizer needs Node.js (20 or newer) \
             with npm, to install the chart library (uPlot) that the web page embeds: \
             install it, or set SCHOLIA_NPM to the npm executable, or run \
             `npm ci --no-audit --no-fund` in {} yourself.",
            web.display()
        )),
        Err(e) => fail(&format!("could not run `{npm}`: {e}")),
    }
}

fn copy(from: &Path, to: &Path) {
    // Write only when the bytes changed, so that the crate is not rebuilt for nothing.
    let bytes = match fs::read(from) {
        Ok(b) => b,
        Err(e) => fail(&format!("cannot read {}: {e}", from.display())),
    };
    if fs::read(to).is_ok_and(|old| old == bytes) {
        return;
    }
    if let Err(e) = fs::write(to, &bytes) {
        fail(&format!("cannot write {}: {e}", to.display()));
    }
}

fn env_var(name: &str) -> String {
    match env::var(name) {
        Ok(v) => v,
        Err(_) => fail(&format!("{name} is not set (this script runs under cargo)")),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: scholia-visualizer build script: {message}");
    process::exit(1);
}
