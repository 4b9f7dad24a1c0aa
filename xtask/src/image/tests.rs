use super::*;

/// One Dockerfile instruction: its keyword and the rest, continuation lines joined.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        // Docker skips comments and empty lines also inside a continued instruction.
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(part) = line.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
        let rest = rest.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push((keyword.to_uppercase(), rest));
        current.clear();
    }
    out
}

/// `key="value" key2="value2"` of a LABEL instruction.
fn label_pairs(text: &str) -> BTreeMap<String, String> {
    let mut pairs = BTreeMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once("=\"") {
        let (value, after) = after.split_once('"').expect("a closing quote");
        pairs.insert(key.trim().to_owned(), value.to_owned());
        rest = after.trim();
    }
    assert!(rest.is_empty(), "unparsed LABEL text: {rest}");
    pairs
}

fn dockerfile() -> Vec<(String, String)> {
    let text = fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
    instructions(&text)
}

#[test]
fn the_dockerfile_builds_the_image_xtask_builds() {
    let all = dockerfile();
    let last_from = all.iter().rposition(|(k, _)| k == "FROM").unwrap();
    let (build, image) = all.split_at(last_from);
    assert_eq!(image[0].1, "scratch", "the image starts from nothing");

    // The final stage: exactly these instructions, with the values of image_config().
    let keywords: Vec<&str> = image.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keywords,
        [
            "FROM",
            "ARG",
            "ARG",
            "ARG",
            "COPY",
            "ENV",
            "LABEL",
            "ENTRYPOINT"
        ]
    );
    let args: Vec<&str> = image
        .iter()
        .filter(|(k, _)| k == "ARG")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        args,
        [
            format!("VERSION={VERSION}").as_str(),
            "REVISION=unknown",
            "SOURCE="
        ]
    );
    let field = |keyword: &str| &image.iter().find(|(k, _)| k == keyword).unwrap().1;
    assert_eq!(field("COPY"), "--from=build /rootfs/ /");
    let config = image_config(&labels("${VERSION}", "${REVISION}", "${SOURCE}"));
    let entrypoint: Value = serde_json::from_str(field("ENTRYPOINT")).unwrap();
    assert_eq!(entrypoint, config["Entrypoint"]);
    assert_eq!(json!([field("ENV")]), config["Env"]);
    assert_eq!(json!(label_pairs(field("LABEL"))), config["Labels"]);
    assert_eq!(
        config.as_object().unwrap().len(),
        3,
        "a new config field needs its Dockerfile instruction"
    );

    // The build stage makes /rootfs as stage_rootfs() does, from the same build.
    let run = build
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, v)| v.as_str())
        .find(|v| v.contains("cargo build"))
        .unwrap();
    let words: Vec<&str> = run.split_whitespace().collect();
    let build_command =
        format!("cargo build --locked --profile {PROFILE} --target {TARGET} -p clink-agent --bins");
    assert!(words.join(" ").contains(&build_command), "{run}");
    let mkdir: BTreeSet<&str> = words
        .iter()
        .skip_while(|w| **w != "mkdir")
        .skip(2)
        .take_while(|w| **w != "&&")
        .copied()
        .collect();
    let dirs: BTreeSet<String> = DIRS
        .iter()
        .chain([&BIN_DIR])
        .map(|d| format!("/rootfs{d}"))
        .collect();
    assert_eq!(mkdir, dirs.iter().map(String::as_str).collect());
    let cp: Vec<&str> = words
        .iter()
        .skip_while(|w| **w != "cp")
        .skip(1)
        .copied()
        .collect();
    let mut expected: Vec<String> = BINARIES
        .iter()
        .map(|b| format!("target/{TARGET}/{PROFILE}/{b}"))
        .collect();
    expected.push(format!("/rootfs{BIN_DIR}/"));
    assert_eq!(cp, expected);
}

#[test]
fn the_chart_runs_the_image_xtask_tags() {
    let chart = workspace_root().join("charts/clusterlink");
    let values = fs::read_to_string(chart.join("values.yaml")).unwrap();
    let image = values
        .split("\nimage:\n")
        .nth(1)
        .expect("an image: section in values.yaml");
    let value = |key: &str| {
        image
            .lines()
            .take_while(|l| l.starts_with(' ') || l.is_empty())
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no image.{key} in values.yaml"))
            .trim()
            .to_owned()
    };
    assert_eq!(value("repository:"), REPOSITORY);
    assert_eq!(
        value("tag:"),
        "\"\"",
        "an empty tag: the chart's appVersion"
    );
    let chart_yaml = fs::read_to_string(chart.join("Chart.yaml")).unwrap();
    assert!(
        chart_yaml.contains(&format!("\nappVersion: \"{VERSION}\"\n")),
        "the chart's appVersion must be the workspace version, {VERSION}"
    );
}

#[test]
fn instructions_join_continuations_and_skip_comments() {
    let parsed = instructions("# c\nFROM x AS y\nRUN a \\\n  b \\\n c\n\nENV K=v\n");
    assert_eq!(
        parsed,
        [
            ("FROM".to_owned(), "x AS y".to_owned()),
            ("RUN".to_owned(), "a b c".to_owned()),
            ("ENV".to_owned(), "K=v".to_owned()),
        ]
    );
}

#[test]
fn references_default_the_tag_and_name_docker_hub() {
    let r = Reference::parse("clusterlink-rs/clink-agent").unwrap();
    assert_eq!(
        r.to_string(),
        format!("clusterlink-rs/clink-agent:{VERSION}")
    );
    assert_eq!(
        r.normalized(),
        format!("docker.io/clusterlink-rs/clink-agent:{VERSION}")
    );
    let r = Reference::parse("agent:dev").unwrap();
    assert_eq!(r.normalized(), "docker.io/library/agent:dev");
    let r = Reference::parse("localhost:5000/cl/agent").unwrap();
    assert_eq!(r.tag, VERSION, "the port is not a tag");
    assert_eq!(r.normalized(), format!("localhost:5000/cl/agent:{VERSION}"));
    let r = Reference::parse("registry.example.com/cl/agent:1.2.3-rc.1").unwrap();
    assert_eq!(r.annotations()[oci::REF_NAME], "1.2.3-rc.1");
    assert_eq!(
        r.annotations()[oci::CONTAINERD_NAME],
        "registry.example.com/cl/agent:1.2.3-rc.1"
    );
    for bad in ["Agent:1", "agent:", "agent:-x", "a//b:1", "agent:a+b"] {
        assert!(Reference::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_layer_listing_must_hold_exactly_the_image_files() {
    let line = |mode: &str, owner: &str, path: &str| {
        format!("{mode} {owner}  0 2026-05-20 10:00 {path}\n")
    };
    let good: String = expected_entries()
        .iter()
        .map(|(path, dir)| {
            let mode = if *dir { "drwxr-xr-x" } else { "-rwxr-xr-x" };
            line(mode, "0/0", path)
        })
        .collect();
    check_entries(&good).unwrap();
    assert!(good.contains(" usr/local/bin/clink-agent\n"));
    assert!(good.contains(" run/clusterlink/cgroupv2/\n"));

    let extra = good.clone() + &line("drwxrwxrwt", "0/0", "tmp/");
    assert!(check_entries(&extra).is_err());
    let missing: String = good
        .lines()
        .filter(|l| !l.ends_with("/clink"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(check_entries(&missing).is_err());
    let foreign = good.replace(
        "0/0  0 2026-05-20 10:00 usr/local/bin/clink\n",
        "1000/1000  0 2026-05-20 10:00 usr/local/bin/clink\n",
    );
    assert!(check_entries(&foreign).is_err());
}
