// Command stasis is transparent checkpoint/restore for Kubernetes workloads. One binary, one
// subcommand per role: the admission webhook, the node agent, the launcher that runs as PID 1 of
// every checkpoint-enabled container, and helpers used inside pods and by installers.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"syscall"

	"github.com/stasis-k8s/stasis/agent"
	"github.com/stasis-k8s/stasis/certs"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/internal/version"
	"github.com/stasis-k8s/stasis/launcher"
	"github.com/stasis-k8s/stasis/podtools"
	"github.com/stasis-k8s/stasis/webhook"
	"github.com/stasis-k8s/stasis/wiring"
)

type command struct {
	run     func(ctx context.Context, args []string) error
	summary string
	// ownSignals: the command handles signals itself (the launcher forwards them to the app).
	ownSignals bool
	// hidden: run by stasis itself, not listed.
	hidden bool
}

var commands = map[string]command{
	"webhook":                     {run: webhook.Run, summary: "serve the admission webhooks (eviction, Job suspend, pod creation)"},
	"agent":                       {run: agent.Run, summary: "serve the node agent that checkpoints containers with CRIU"},
	wiring.LauncherSubcommand:     {run: launcher.Run, summary: "run a container's command as its unprivileged PID 1, so that the agent can checkpoint and restore it", ownSignals: true},
	"certs":                       {run: certs.Run, summary: "generate the TLS Secrets for clusters without cert-manager"},
	wiring.ToolsInstallSubcommand: {run: podtools.ToolsInstall, summary: "copy the stasis binary into a pod's tools volume (tools init-container)"},
	agent.GuardSubcommand:         {run: agent.RunGuard, summary: "a lazy restore's guard, started by the agent", ownSignals: true, hidden: true},
	checkpoint.Subcommand:         {run: checkpoint.Run, summary: "tools on checkpoints, run on a node by root: 'export' writes a checkpoint's images as plain CRIU files"},
	"version": {run: func(context.Context, []string) error {
		fmt.Println(version.Version)
		return nil
	}, summary: "print the version"},
}

func usage() {
	fmt.Fprintf(os.Stderr, "Usage: stasis <command> [flags]\n\nCommands:\n")
	names := make([]string, 0, len(commands))
	for n, c := range commands {
		if c.hidden {
			continue
		}
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-16s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(os.Stderr, "\nRun 'stasis <command> --help' for its flags; every flag also reads $STASIS_<FLAG>.\n")
}

func run() error {
	if len(os.Args) < 2 || os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help" {
		usage()
		return nil
	}
	cmd, ok := commands[os.Args[1]]
	if !ok {
		usage()
		return fmt.Errorf("unknown command %q", os.Args[1])
	}
	ctx := context.Background()
	if !cmd.ownSignals {
		var stop context.CancelFunc
		ctx, stop = signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
		defer stop()
	}
	return cmd.run(ctx, os.Args[2:])
}

func main() {
	if err := run(); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "stasis: %v\n", err)
		os.Exit(1)
	}
}
