//! `--cache-from` / `--cache-to`: a layer cache kept in a registry, so a
//! fresh or preempted builder VM does not start cold.
//!
//! docker's syntax is passed through when the builder's `docker build` is
//! buildx (it lists `--cache-to`). The plain `docker build` of docker 20.10
//! with BuildKit knows only image references in `--cache-from` and the
//! inline cache, so there `type=registry,ref=R` becomes `--cache-from R`,
//! `--cache-to type=inline` becomes `--build-arg BUILDKIT_INLINE_CACHE=1`,
//! and an exported cache (`type=registry`, `local`, …) is refused.

/// One `--cache-from`/`--cache-to` value, split into its `key=value` pairs.
fn fields(spec: &str) -> Vec<(&str, &str)> {
    spec.split(',').filter_map(|p| p.split_once('=')).collect()
}

fn get<'a>(f: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    f.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// The image reference a cache value names in a registry, if any.
pub fn registry_ref(spec: &str) -> Option<String> {
    if !spec.contains('=') {
        return Some(spec.to_string());
    }
    let f = fields(spec);
    match get(&f, "type") {
        Some("registry") | None => get(&f, "ref").map(str::to_string),
        _ => None,
    }
}

/// `docker build` arguments for the caches; `buildx`: the builder's
/// `docker build` accepts `--cache-to` (it is buildx).
pub fn docker_args(from: &[String], to: &[String], buildx: bool) -> Result<Vec<String>, String> {
    let mut argv = Vec::new();
    for spec in from {
        argv.push("--cache-from".to_string());
        if buildx {
            argv.push(spec.clone());
            continue;
        }
        let f = fields(spec);
        match (spec.contains('='), get(&f, "type"), registry_ref(spec)) {
            (false, _, _) => argv.push(spec.clone()),
            (true, Some("registry") | None, Some(r)) => argv.push(r),
            _ => {
                return Err(format!(
                    "`--cache-from {spec}`: the builder's `docker build` (without buildx) reads caches only from images in a registry (`type=registry,ref=IMAGE`)"
                ));
            }
        }
    }
    for spec in to {
        let f = fields(spec);
        if get(&f, "type") == Some("inline") && !buildx {
            argv.extend(["--build-arg".into(), "BUILDKIT_INLINE_CACHE=1".into()]);
        } else if buildx {
            argv.extend(["--cache-to".into(), spec.clone()]);
        } else {
            return Err(format!(
                "`--cache-to {spec}`: the builder's `docker build` is not buildx, which exporting a cache needs; use `--cache-to type=inline` (the cache travels in the pushed image) or install buildx on the builder"
            ));
        }
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn translation_table() {
        let from = s(&["type=registry,ref=r/app:cache", "r/app:latest"]);
        assert_eq!(
            docker_args(&from, &s(&["type=inline"]), false).unwrap(),
            s(&[
                "--cache-from",
                "r/app:cache",
                "--cache-from",
                "r/app:latest",
                "--build-arg",
                "BUILDKIT_INLINE_CACHE=1"
            ])
        );
        let to = s(&["type=registry,ref=r/app:cache,mode=max"]);
        assert_eq!(
            docker_args(&from, &to, true).unwrap(),
            s(&[
                "--cache-from",
                "type=registry,ref=r/app:cache",
                "--cache-from",
                "r/app:latest",
                "--cache-to",
                "type=registry,ref=r/app:cache,mode=max"
            ])
        );
        assert!(
            docker_args(&[], &to, false)
                .unwrap_err()
                .contains("not buildx")
        );
        assert!(docker_args(&s(&["type=local,src=/x"]), &[], false).is_err());
        assert_eq!(
            registry_ref("type=registry,ref=h:5000/a:c").as_deref(),
            Some("h:5000/a:c")
        );
        assert_eq!(registry_ref("type=local,src=/x"), None);
    }
}
