// Package wiring is the contract between the webhook, which wires a checkpoint-enabled pod, and the
// processes that run inside that pod (the tools and restore init-containers, the launcher) and the
// agent that dumps it: volume names, mount paths, environment variables, the launcher's argv and
// the annotations Stasis writes. The webhook writes these, the launcher and agent read them; both
// sides are tested against the functions here.
package wiring

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"strings"
	"time"
)

// Paths and names inside a wired pod.
const (
	// ToolsVolume is an emptyDir that the tools init-container fills with the stasis binary and
	// CRIU; mounted read-only at ToolsMount in every wrapped container.
	ToolsVolume = "stasis-tools"
	ToolsMount  = "/stasis/tools"
	// ToolsInitContainer copies the stasis binary into the tools volume (the Stasis image running
	// `stasis tools-install`), unprivileged.
	ToolsInitContainer = "stasis-tools"

	// CheckpointVolume is the name of the checkpoint volume Stasis adds when it created the PVC
	// itself; a user-provided volume (checkpoint-storage-volume) keeps its own name.
	CheckpointVolume = "stasis-checkpoints"
	// CheckpointMount is where the checkpoint volume is mounted in wrapped containers and in the
	// restore init-container. Checkpoints live at CheckpointMount/<identity>/<container>/<id>/.
	CheckpointMount = "/stasis/checkpoints"

	// AgentSocket is the launchers' channel to the node agent: an abstract unix socket the agent
	// listens on inside each wired pod's network namespace (no volume in the pod). HostAgentDir/
	// AgentSocketName is the same channel on the node, for the agent's own checks and people.
	AgentSocket     = "@stasis-agent"
	HostAgentDir    = "/run/stasis"
	AgentSocketName = "launcher.sock"

	// ImageBinary is where the stasis binary lives in the Stasis image.
	ImageBinary = "/usr/local/bin/stasis"
	// Binary is where the tools init-container puts the stasis binary inside the pod.
	Binary = ToolsMount + "/stasis"
)

// Environment variables set on wrapped containers (and on the restore init-container).
const (
	EnvPodName       = "STASIS_POD_NAME"      // downward API metadata.name
	EnvPodNamespace  = "STASIS_POD_NAMESPACE" // downward API metadata.namespace
	EnvPodUID        = "STASIS_POD_UID"       // downward API metadata.uid
	EnvContainerName = "STASIS_CONTAINER_NAME"
	EnvImage         = "STASIS_IMAGE" // the container's spec.image, for entrypoint lookup
	EnvCheckpointDir = "STASIS_CHECKPOINT_DIR"
	// EnvRestoreID names the checkpoint to restore; set only on pods created while a complete
	// checkpoint exists for their identity.
	EnvRestoreID = "STASIS_RESTORE_ID"
	// EnvRestoreOptions is a JSON array of extra, validated CRIU restore options
	// (restore-advanced-options / MMC_RESTORE_ADVANCED_OPTIONS).
	EnvRestoreOptions = "STASIS_RESTORE_OPTIONS"
	// EnvIdentity is the checkpoint identity (also the pod annotation AnnotationIdentity).
	EnvIdentity = "STASIS_IDENTITY"
	// EnvFreezeWatchdog is how long the launcher lets its app stay frozen without a SIGTERM
	// before it resumes it itself (Go duration).
	EnvFreezeWatchdog = "STASIS_FREEZE_WATCHDOG"
	// EnvGracePeriod is the pod's terminationGracePeriodSeconds: how long the launcher may spend
	// on a checkpoint after SIGTERM before the kubelet kills the container.
	EnvGracePeriod = "STASIS_GRACE_PERIOD"
)

// TerminationMargin is what the launcher keeps of the grace period to end the app after a
// checkpoint on SIGTERM (or to let it end by itself when there is none): the dump gets the grace
// period less this.
const TerminationMargin = 3 * time.Second

// DefaultFreezeWatchdog is the launcher's limit on a frozen app when EnvFreezeWatchdog does not
// say: longer than the agent's --freeze-timeout (5m), which thaws first when it can.
const DefaultFreezeWatchdog = 15 * time.Minute

// Annotations Stasis writes (its own prefix, independent of the user-facing label prefix).
const (
	Prefix = "stasis.dev/"
	// AnnotationIdentity is the pod's checkpoint identity, chosen at creation.
	AnnotationIdentity = Prefix + "identity"
	// AnnotationRestore describes the checkpoint a pod restores from: JSON RestoreRef.
	AnnotationRestore = Prefix + "restore"
	// AnnotationCheckpoint is what the agent dumps when the pod ends without an admission review
	// (SIGTERM reaching the launcher): JSON agentapi.CheckpointRequest without pod and reason,
	// written by the webhook at creation (users cannot set stasis.dev/* annotations).
	AnnotationCheckpoint = Prefix + "checkpoint"
	// AnnotationWired marks a pod the webhook has already wired (reinvocation safety).
	AnnotationWired = Prefix + "wired"
)

// Subcommands of the stasis binary that run in pods. Launcher argv: [Binary, "launcher", flags...,
// "--", command...].
const (
	LauncherSubcommand     = "launcher"
	ToolsInstallSubcommand = "tools-install"
	// FlagEntrypointFromImage tells the launcher that the pod set no command: what follows "--" are
	// the spec's args (possibly none), to be appended to the image's ENTRYPOINT (or to replace its CMD).
	FlagEntrypointFromImage = "--entrypoint-from-image"
)

// RestoreRef is the value of AnnotationRestore.
type RestoreRef struct {
	ID string `json:"id"`
	// Containers restore from ID together, or all start afresh.
	Containers []string `json:"containers,omitempty"`
	Node       string   `json:"node"`
	Time       string   `json:"time"`
	Size       int64    `json:"size"`
	Message    string   `json:"message,omitempty"`
}

// LauncherCommand is the container command that wraps the original one. A container without a
// command keeps its args; the launcher then resolves the image's entrypoint at start.
func LauncherCommand(command []string) []string {
	argv := []string{Binary, LauncherSubcommand}
	if len(command) == 0 {
		argv = append(argv, FlagEntrypointFromImage)
	}
	argv = append(argv, "--")
	return append(argv, command...)
}

// Launch is what the launcher parses from its argv (after the subcommand) and the container's args.
type Launch struct {
	// EntrypointFromImage: Command holds only the spec's args; the image config supplies the rest.
	EntrypointFromImage bool
	// Command is the original command followed by the spec's args.
	Command []string
}

// ParseLauncherArgs parses the arguments after "launcher" (Kubernetes appends the container's args
// after the command, so they follow the original command after "--").
func ParseLauncherArgs(args []string) (Launch, error) {
	var l Launch
	for i, a := range args {
		switch a {
		case FlagEntrypointFromImage:
			l.EntrypointFromImage = true
		case "--":
			l.Command = append([]string{}, args[i+1:]...)
			if len(l.Command) == 0 && !l.EntrypointFromImage {
				return l, errors.New("launcher: no command after --")
			}
			return l, nil
		default:
			return l, fmt.Errorf("launcher: unknown argument %q before --", a)
		}
	}
	return l, errors.New("launcher: missing -- before the command")
}

// Wrapped reports whether a container command was already wrapped by the launcher.
func Wrapped(command []string) bool {
	return len(command) >= 2 && command[0] == Binary && command[1] == LauncherSubcommand
}

var unsafeChars = regexp.MustCompile(`[^a-zA-Z0-9_.-]+`)

// IdentityDir turns a checkpoint identity (e.g. "job/ns/train/3") into one path element.
func IdentityDir(identity string) string {
	s := unsafeChars.ReplaceAllString(strings.ReplaceAll(identity, "/", "_"), "-")
	if s == "" || s == "." || s == ".." {
		s = "_" + s
	}
	return s
}

// CheckpointDir is a container's checkpoint directory inside the pod.
func CheckpointDir(identity, container string) string {
	return path.Join(CheckpointMount, IdentityDir(identity), container)
}
