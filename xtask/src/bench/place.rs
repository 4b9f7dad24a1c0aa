//! Where the bench runs a process: a cluster's network namespace and, for the data paths
//! that attach eBPF programs to a cgroup, a cgroup v2 directory of the bench's own
//! ([`clink_testbed::Cgroup`]).
//!
//! Such a cgroup holds one data path's agents and every client and server of that path, and
//! nothing else, so the programs the agents attach see only the bench's traffic; it is never
//! the machine's root cgroup. Dropping it kills what is still inside and removes it.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

use clink_testbed::Cgroup;

/// A network namespace, optionally with a cgroup that processes started there join.
#[derive(Clone, Debug)]
pub struct Place {
    netns: String,
    cgroup: Option<PathBuf>,
}

impl Place {
    pub fn new(netns: &str, cgroup: Option<&Cgroup>) -> Self {
        Self {
            netns: netns.to_owned(),
            cgroup: cgroup.map(|cg| cg.path().to_owned()),
        }
    }

    /// A command that runs `program` here: with a cgroup, inside it from the start (see
    /// [`clink_testbed::command_in`]), so every socket the program opens belongs to it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.cgroup {
            None => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.netns]).arg(program);
                cmd
            }
            Some(cgroup) => clink_testbed::command_in(cgroup, &self.netns, program),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_run_in_the_namespace_and_join_the_cgroup_first() {
        let plain = Place::new("clk-1-0-a", None).command("iperf3");
        assert_eq!(crate::run::show(&plain), "ip netns exec clk-1-0-a iperf3");
        let place = Place {
            netns: "clk-1-0-a".into(),
            cgroup: Some(PathBuf::from("/cg/clk-1-1-sockmap")),
        };
        let cmd = place.command("iperf3");
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(cmd.get_program(), "sh");
        assert_eq!(
            args[2..],
            [
                "/cg/clk-1-1-sockmap",
                "nsenter",
                "--net=/run/netns/clk-1-0-a",
                "iperf3"
            ]
        );
    }
}
