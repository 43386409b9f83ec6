//! Desktop notifications for new access requests, where the desktop offers them: a program run
//! with the message as an argument (never through a shell), in the background; its failure
//! (no such program, no desktop session) only costs the notification.

use std::process::{Command, Stdio};

use crate::access::Notifier;

/// Shows `message` under the title "capit", without waiting for it.
pub fn desktop(notifier: &Notifier, message: &str) {
    let Some(mut command) = command(notifier, message) else { return };
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    tokio::task::spawn_blocking(move || match command.status() {
        Ok(status) if !status.success() => tracing::debug!(%status, "the desktop notification failed"),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "no desktop notification"),
    });
}

/// The command that shows `message` under the title "capit"; `None` when notifications are off.
/// Spend alerts run it on their own worker thread (`events`).
pub fn command(notifier: &Notifier, message: &str) -> Option<Command> {
    let message: String = message.chars().filter(|c| !c.is_control()).take(400).collect();
    Some(match notifier {
        Notifier::None => return None,
        Notifier::Program(program) => {
            let mut c = Command::new(program);
            c.arg("capit").arg(&message);
            c
        }
        Notifier::AppleScript => {
            let quoted = message.replace('\\', "\\\\").replace('"', "\\\"");
            let mut c = Command::new("osascript");
            c.arg("-e").arg(format!("display notification \"{quoted}\" with title \"capit\""));
            c
        }
    })
}
