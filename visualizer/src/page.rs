//! The visualizer's web pages: the analysts' page at `GET /`, the operators' console at
//! `GET /admin`, and their assets under `/assets/`; and the visualizer's part of the
//! OpenAPI document ([`openapi`]), the websocket's included.
//!
//! The hand-written page (`web/index.html`, `web/app.js`, `web/style.css`), the console
//! (`web/admin.html`, `web/admin.js`, `web/admin.css`) and what they share
//! (`web/common.js`, `web/common.css`) are embedded from `web/`; uPlot, installed from the
//! npm registry through `web/package-lock.json`, from `$OUT_DIR/web/`, where `build.rs`
//! copies it. So the binary serves both with no network and no files beside it.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::OpenApi;

/// A hand-written file of `web/`.
macro_rules! web_file {
    ($file:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/", $file))
    };
}

/// A file of the uPlot package, which `build.rs` copies into `$OUT_DIR/web/`.
macro_rules! uplot_file {
    ($file:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/web/", $file))
    };
}

const INDEX_HTML: &[u8] = web_file!("index.html");
const APP_JS: &[u8] = web_file!("app.js");
const STYLE_CSS: &[u8] = web_file!("style.css");
const ADMIN_HTML: &[u8] = web_file!("admin.html");
const ADMIN_JS: &[u8] = web_file!("admin.js");
const ADMIN_CSS: &[u8] = web_file!("admin.css");
const COMMON_JS: &[u8] = web_file!("common.js");
const COMMON_CSS: &[u8] = web_file!("common.css");
const UPLOT_JS: &[u8] = uplot_file!("uPlot.iife.min.js");
const UPLOT_CSS: &[u8] = uplot_file!("uPlot.min.css");

const HTML: &str = "text/html; charset=utf-8";

/// The page and the console load only their own assets and talk only to their own
/// origin (the HTTP API and the websocket); uPlot sets inline styles on its elements.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self' ws: wss:; object-src 'none'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'self'";

/// One of the files below, as `content_type`, with `Cache-Control: no-cache`; an HTML page
/// also with the headers that keep it to its own origin.
fn serve(body: &'static [u8], content_type: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 3] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    let mut response = (headers, body).into_response();
    if content_type == HTML {
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        // The token may arrive in the page's query string: never send it elsewhere.
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    response
}

/// The table of what is served: for each file, the handler of `GET path` (doc comment and
/// all, which become the operation's summary and description), the bytes, the media type
/// (served with `; charset=utf-8`) and the description of the answer. It makes the
/// handlers, [`router`] and the document of them all.
macro_rules! files {
    ($(
        $(#[doc = $doc:tt])*
        $handler:ident: $path:tt => $body:ident, $media_type:tt, $answer:tt;
    )*) => {
        $(
            $(#[doc = $doc])*
            #[utoipa::path(
                get,
                path = $path,
                tag = "page",
                responses((status = 200, description = $answer, body = String, content_type = $media_type))
            )]
            async fn $handler() -> Response {
                serve($body, concat!($media_type, "; charset=utf-8"))
            }
        )*

        #[derive(OpenApi)]
        #[openapi(
            paths(crate::hub::upgrade, $($handler),*),
            tags(
                (name = "live", description = "The websocket that feeds live charts (the protocol is in SPEC §6)."),
                (name = "page", description = "The visualizer's web page, the operators' console, and their assets, served from the binary.")
            )
        )]
        struct VisualizerDoc;

        /// Routes of the page and the console: `GET /`, `GET /admin` and `GET /assets/…`
        /// (HEAD too), each with its content type and `Cache-Control: no-cache`.
        pub fn router() -> Router {
            Router::new()$(.route($path, get($handler)))*
        }
    };
}

files! {
    /// The visualizer page.
    ///
    /// It takes a token as `?token=`, which it never sends elsewhere.
    index: "/" => INDEX_HTML, "text/html", "The page.";
    /// The page's script.
    app_js: "/assets/app.js" => APP_JS, "text/javascript", "The page's script.";
    /// The page's style sheet.
    style_css: "/assets/style.css" => STYLE_CSS, "text/css", "The page's style sheet.";
    /// uPlot, the charting library.
    uplot_js: "/assets/uPlot.iife.min.js" => UPLOT_JS, "text/javascript", "uPlot, the charting library.";
    /// uPlot's style sheet.
    uplot_css: "/assets/uPlot.min.css" => UPLOT_CSS, "text/css", "uPlot's style sheet.";
    /// The operators' console.
    ///
    /// It asks for an admin token (or takes one as `?token=`, which it drops from the address
    /// bar and never sends elsewhere) and then uses the HTTP API and the websocket.
    admin: "/admin" => ADMIN_HTML, "text/html", "The console.";
    /// The console's script.
    admin_js: "/assets/admin.js" => ADMIN_JS, "text/javascript", "The console's script.";
    /// The console's style sheet.
    admin_css: "/assets/admin.css" => ADMIN_CSS, "text/css", "The console's style sheet.";
    /// What the page's and the console's scripts share.
    common_js: "/assets/common.js" => COMMON_JS, "text/javascript", "What the page's and the console's scripts share.";
    /// What the page's and the console's style sheets share.
    common_css: "/assets/common.css" => COMMON_CSS, "text/css", "What the page's and the console's style sheets share.";
}

/// The OpenAPI document of the visualizer's endpoints: the websocket and the page.
pub fn openapi() -> utoipa::openapi::OpenApi {
    VisualizerDoc::openapi()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[test]
    fn index_references_every_asset() {
        for asset in [
            "assets/app.js",
            "assets/style.css",
            "assets/common.js",
            "assets/common.css",
            "assets/uPlot.iife.min.js",
            "assets/uPlot.min.css",
        ] {
            assert!(
                contains(INDEX_HTML, asset),
                "index.html does not load {asset}"
            );
        }
        // Works offline: nothing is loaded from another origin.
        assert!(!contains(INDEX_HTML, "http://") && !contains(INDEX_HTML, "https://"));
    }

    #[test]
    fn the_console_references_its_assets_and_nothing_outside() {
        for asset in [
            "assets/admin.js",
            "assets/admin.css",
            "assets/common.js",
            "assets/common.css",
        ] {
            assert!(
                contains(ADMIN_HTML, asset),
                "admin.html does not load {asset}"
            );
        }
        for page in [ADMIN_HTML, ADMIN_JS, ADMIN_CSS, COMMON_JS, COMMON_CSS] {
            assert!(!contains(page, "http://") && !contains(page, "https://"));
        }
        // It talks to the API with a bearer token and to the websocket with `?token=`,
        // through what it shares with the page.
        assert!(contains(COMMON_JS, "Authorization"));
        assert!(contains(COMMON_JS, "searchParams.set('token'"));
        assert!(contains(ADMIN_JS, "window.Scholia") && contains(APP_JS, "window.Scholia"));
        assert!(contains(ADMIN_JS, "dry_run: true"));
        assert!(contains(ADMIN_CSS, "[data-status=\"failed\"]"));
    }

    #[test]
    fn assets_are_embedded() {
        assert!(
            contains(UPLOT_JS, "uPlot"),
            "uPlot.iife.min.js is not uPlot"
        );
        assert!(
            contains(UPLOT_CSS, ".uplot"),
            "uPlot.min.css is not uPlot's"
        );
        assert!(contains(APP_JS, "\"subscribe\"") || contains(APP_JS, "'subscribe'"));
        assert!(contains(APP_JS, "data-ready") || contains(APP_JS, "dataset.ready"));
        assert!(contains(STYLE_CSS, "[data-status=\"failed\"]"));
    }

    /// Serves the router on a local port and reads raw HTTP responses from it.
    async fn get_raw(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        String::from_utf8_lossy(&response).into_owned()
    }

    #[tokio::test]
    async fn serves_page_and_assets_with_content_types() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            axum::serve(listener, router()).await.expect("serve");
        });

        for (path, content_type, marker) in [
            ("/", "text/html; charset=utf-8", "assets/app.js"),
            (
                "/assets/app.js",
                "text/javascript; charset=utf-8",
                "subscribe",
            ),
            (
                "/assets/style.css",
                "text/css; charset=utf-8",
                "data-status",
            ),
            (
                "/assets/uPlot.iife.min.js",
                "text/javascript; charset=utf-8",
                "uPlot",
            ),
            ("/assets/uPlot.min.css", "text/css; charset=utf-8", ".uplot"),
            ("/admin", "text/html; charset=utf-8", "assets/admin.js"),
            (
                "/assets/admin.js",
                "text/javascript; charset=utf-8",
                "subscribe",
            ),
            (
                "/assets/admin.css",
                "text/css; charset=utf-8",
                "data-status",
            ),
            (
                "/assets/common.js",
                "text/javascript; charset=utf-8",
                "LiveSocket",
            ),
            ("/assets/common.css", "text/css; charset=utf-8", ".conn"),
        ] {
            let response = get_raw(addr, path).await;
            let lower = response.to_ascii_lowercase();
            assert!(
                response.starts_with("HTTP/1.1 200"),
                "{path}: {}",
                response.chars().take(300).collect::<String>()
            );
            assert!(
                lower.contains(&format!("content-type: {content_type}")),
                "{path}: wrong content type"
            );
            assert!(
                lower.contains("cache-control: no-cache"),
                "{path}: no Cache-Control"
            );
            assert!(response.contains(marker), "{path}: body lacks {marker}");
        }
        for page in ["/", "/admin"] {
            let page = get_raw(addr, page).await.to_ascii_lowercase();
            assert!(
                page.contains("content-security-policy: default-src 'self'"),
                "{page}"
            );
            assert!(page.contains("referrer-policy: no-referrer"), "{page}");
        }
        let missing = get_raw(addr, "/assets/nope.js").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        server.abort();
    }
}
