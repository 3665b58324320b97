//! Google Cloud Build as a builder.

use tokio_util::sync::CancellationToken;

use super::Package;
use crate::build::{BuildReport, BuildRequest};
use crate::config::Builder;
use crate::report::Reporter;

pub async fn run(
    _builder: &Builder,
    _req: &BuildRequest,
    _package: &Package,
    _reporter: &dyn Reporter,
    _cancel: &CancellationToken,
    _report: &mut BuildReport,
) -> anyhow::Result<()> {
    anyhow::bail!("cloudbuild: not yet")
}
