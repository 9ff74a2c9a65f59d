//! The `jetinfer` CLI takes its NATS credentials from `--nats-config` (the
//! `[nats]` table of a TOML file) and `JETINFER_NATS__*` variables, against a
//! real nats-server that requires a token: the right token gets through (to
//! the next question, whether a worker serves the model), a wrong one is
//! refused with an error that names the token file, not the token.

use std::process::Command;

use jetinfer_nats::testing::NatsServer;

const TOKEN: &str = "cli-token-4e0c9a";
const WRONG: &str = "cli-token-guess1";

fn token_server(dir: &std::path::Path) -> NatsServer {
    let conf = dir.join("server.conf");
    std::fs::write(&conf, format!("authorization {{ token: \"{TOKEN}\" }}\n")).unwrap();
    NatsServer::start_with_config(&conf, &[])
}

fn jetinfer(server: &NatsServer) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jetinfer"));
    cmd.args(["--nats-url", &server.url(), "--timeout", "5"])
        .env_remove("JETINFER_NATS_URL")
        .env_remove("JETINFER_NATS_CONFIG")
        .env("JETINFER_NATS__STARTUP_RETRY_FOR", "2");
    cmd
}

/// Everything the command printed: errors of single jobs go to stdout as
/// JSON lines, errors of the command itself to stderr.
fn printed(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn token_from_the_config_file_or_environment_is_used_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let server = token_server(dir.path());
    let right = dir.path().join("token");
    std::fs::write(&right, format!("{TOKEN}\n")).unwrap();
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, WRONG).unwrap();
    let config = dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "[nats.auth]\nkind = \"token\"\ntoken_file = \"{}\"\n",
            right.display()
        ),
    )
    .unwrap();

    // The file's token: connected, and told there is no worker for the model.
    let out = jetinfer(&server)
        .arg("--nats-config")
        .arg(&config)
        .args(["embed", "hello"])
        .output()
        .unwrap();
    let stderr = printed(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("no worker serves model"), "{stderr}");

    // The environment overrides the file: the wrong token is refused.
    let out = jetinfer(&server)
        .arg("--nats-config")
        .arg(&config)
        .env("JETINFER_NATS__AUTH__TOKEN_FILE", &wrong)
        .args(["embed", "hello"])
        .output()
        .unwrap();
    let stderr = printed(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(
        !stderr.contains(WRONG) && !stderr.contains(TOKEN),
        "{stderr}"
    );

    // Environment only, no file.
    let out = jetinfer(&server)
        .env("JETINFER_NATS__AUTH__KIND", "token")
        .env("JETINFER_NATS__AUTH__TOKEN_FILE", &right)
        .args(["embed", "hello"])
        .output()
        .unwrap();
    let stderr = printed(&out);
    assert!(stderr.contains("no worker serves model"), "{stderr}");

    // No credentials at all: refused.
    let out = jetinfer(&server).args(["embed", "hello"]).output().unwrap();
    let stderr = printed(&out);
    assert!(stderr.contains("refused the credentials"), "{stderr}");
}
