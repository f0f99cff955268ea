// Package launcher is `stasis launcher`, PID 1 of every checkpoint-enabled container.
//
// Fresh start: the launcher re-executes itself into a new PID namespace as a minimal init (it
// reaps orphans and forwards signals) that runs the app. The tree below the launcher is what the
// agent dumps; being PID 1 of its own namespace is what lets CRIU restore it in another container
// without colliding with live PIDs.
//
// Restore: when the pod was created to continue a checkpoint, the launcher puts the checkpoint's
// files back and runs `criu restore` as its child, then supervises the restored tree exactly like a
// fresh one. Anything wrong with the checkpoint or the restore falls back to a cold start: a
// checkpoint problem must never become a crash loop.
package launcher

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/wiring"
)

// Overrides of the in-pod paths, for running the launcher outside a wired pod (tests, debugging).
const (
	EnvCriuPath     = "STASIS_CRIU_PATH"        // default wiring.CriuBinary
	EnvAgentSocket  = "STASIS_AGENT_SOCKET"     // default wiring.AgentMount/wiring.AgentSocketName
	EnvRestorePlans = "STASIS_RESTORE_PLAN_DIR" // default wiring.RestorePlanDir
	// EnvRestoreTimeout bounds `criu restore` (Go duration, default 5m); then a cold start.
	EnvRestoreTimeout = "STASIS_RESTORE_TIMEOUT"
)

// initFlag marks the re-executed launcher that is PID 1 of the nested namespace.
const initFlag = "--stasis-nested-init"

// Run is `stasis launcher`. It does not return on success: it exits with the app's status.
func Run(ctx context.Context, args []string) error {
	log := zerolog.New(os.Stderr).With().Timestamp().Str("component", "stasis-launcher").Logger()
	if len(args) > 0 && args[0] == initFlag {
		os.Exit(runInit(log, args[1:]))
	}
	l, err := wiring.ParseLauncherArgs(args)
	if err != nil {
		return err
	}
	// Nothing but stdio may reach the dumped tree: an fd inherited from the runtime (opened in
	// another mount namespace) makes CRIU fail ("Can't lookup mount").
	_ = unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	// Orphans of the restored tree's CRIU, and the restored root itself, must come back to us even
	// when we are not PID 1 (tests, debugging).
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("launcher: PR_SET_CHILD_SUBREAPER: %w", err)
	}
	// Catch every signal from now on: the kubelet's SIGTERM must reach the app whatever phase we are in.
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs)
	env := launchEnv{
		pod: agentapi.PodRef{
			Namespace: os.Getenv(wiring.EnvPodNamespace),
			Name:      os.Getenv(wiring.EnvPodName),
			UID:       os.Getenv(wiring.EnvPodUID),
		},
		container: os.Getenv(wiring.EnvContainerName),
		image:     os.Getenv(wiring.EnvImage),
		restoreID: os.Getenv(wiring.EnvRestoreID),
		criuPath:  envOr(EnvCriuPath, wiring.CriuBinary),
		socket:    envOr(EnvAgentSocket, filepath.Join(wiring.AgentMount, wiring.AgentSocketName)),
		planDir:   envOr(EnvRestorePlans, wiring.RestorePlanDir),
	}
	s := &supervisor{log: log, sigs: sigs}

	if env.restoreID != "" {
		pid, res := restore(ctx, log, env)
		report(ctx, log, env, res)
		if pid > 0 {
			log.Info().Int("pid", pid).Str("checkpoint", res.CheckpointID).Msg("restored; supervising the restored tree")
			os.Exit(s.supervise(pid))
		}
		log.Warn().Str("checkpoint", env.restoreID).Str("reason", res.Message).Msg("COLD START instead of restore")
	}

	cmd, err := resolveCommand(ctx, env, l)
	if err != nil {
		return err
	}
	pid, err := startInit(cmd)
	if err != nil {
		return fmt.Errorf("launcher: starting %q: %w", cmd, err)
	}
	log.Debug().Strs("command", cmd).Int("pid", pid).Msg("started")
	os.Exit(s.supervise(pid))
	return nil
}

type launchEnv struct {
	pod       agentapi.PodRef
	container string
	image     string
	restoreID string
	criuPath  string
	socket    string
	planDir   string
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// startInit re-executes the launcher as PID 1 of a new PID namespace (Go cannot fork: exec of
// /proc/self/exe with CLONE_NEWPID). Setsid: CRIU needs the session leader inside the dumped tree.
// Only stdio is passed: an fd opened in another mount namespace would make the dump fail.
func startInit(cmd []string) (int, error) {
	self, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, err
	}
	argv := append([]string{self, wiring.LauncherSubcommand, initFlag, "--"}, cmd...)
	files := []uintptr{0, 1, 2}
	// A /dev/null we inherited may have been opened in another mount namespace (the runtime's):
	// CRIU cannot dump it ("Can't lookup mount"). Reopen it here, in the container's.
	for fd := range files {
		if t, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd)); t == "/dev/null" {
			if f, err := os.OpenFile("/dev/null", os.O_RDWR, 0); err == nil {
				files[fd] = f.Fd() // kept open for the launcher's lifetime
			}
		}
	}
	return syscall.ForkExec("/proc/self/exe", argv, &syscall.ProcAttr{
		Env:   initEnv(os.Environ()),
		Files: files,
		Sys:   &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID, Setsid: true},
	})
}

// supervisor forwards signals to the app's root and waits for it, reaping every other child.
type supervisor struct {
	log  zerolog.Logger
	sigs chan os.Signal
}

// supervise returns the exit code of the tree rooted at pid (a child of ours): its exit status, or
// 128+n when killed by signal n. On SIGTERM, a tree that is stopped (the agent dumped it and left
// it frozen) is killed, not resumed: it must not run on after its checkpoint, and the container
// exits 143 so that a Job pod never counts as Succeeded.
func (s *supervisor) supervise(pid int) int {
	exited := make(chan int, 1)
	go func() { exited <- reapUntil(pid) }()
	frozenKill := false
	for {
		select {
		case code := <-exited:
			if frozenKill {
				s.log.Info().Msg("the checkpointed app was killed; exiting 143")
				return 128 + int(syscall.SIGTERM)
			}
			return code
		case sig := <-s.sigs:
			n, ok := sig.(syscall.Signal)
			if !ok || n == syscall.SIGCHLD || n == syscall.SIGURG {
				continue // SIGURG is the Go runtime's preemption signal
			}
			if n == syscall.SIGTERM && Stopped(pid) {
				s.log.Info().Int("pid", pid).Msg("SIGTERM while the app is frozen after its checkpoint: killing it")
				frozenKill = true
				_ = syscall.Kill(pid, syscall.SIGKILL)
				continue
			}
			_ = syscall.Kill(pid, n)
		}
	}
}

// reapUntil reaps children until pid exits and returns its exit code.
func reapUntil(pid int) int {
	for {
		var ws syscall.WaitStatus
		got, err := syscall.Wait4(-1, &ws, 0, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			// ECHILD: pid is not (or no longer) our child; should not happen.
			time.Sleep(100 * time.Millisecond)
			if syscall.Kill(pid, 0) != nil {
				return 255
			}
			continue
		}
		if got == pid {
			return ExitCode(ws)
		}
	}
}

// ExitCode maps a wait status the shell way: the exit status, or 128+n for signal n.
func ExitCode(ws syscall.WaitStatus) int {
	switch {
	case ws.Exited():
		return ws.ExitStatus()
	case ws.Signaled():
		return 128 + int(ws.Signal())
	}
	return 255
}

// Stopped reports whether a process is in the stopped state (T), as CRIU's --leave-stopped leaves it.
func Stopped(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return false
	}
	return s[i+2] == 'T' || s[i+2] == 't'
}

func report(ctx context.Context, log zerolog.Logger, env launchEnv, res agentapi.RestoreResult) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c := agentapi.NewLocalClient(env.socket, 3*time.Second)
	if err := c.ReportRestore(ctx, agentapi.LocalBase, res); err != nil {
		log.Warn().Err(err).Msg("could not report the restore result to the agent (no Event will be recorded)")
	}
}

// envOrigGodebug carries the app's own GODEBUG (or its absence) past the nested init.
const envOrigGodebug = "STASIS_LAUNCHER_ORIG_GODEBUG"

// initEnv is the nested init's environment. The Go runtime keeps cgroup files open to track CPU
// limits (containermaxprocs, updatemaxprocs); the init is dumped and restored with the app, in
// another container, so it must hold no such files: both are turned off for the init only.
func initEnv(env []string) []string {
	out := make([]string, 0, len(env)+2)
	orig, had := "", false
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "GODEBUG="); ok {
			orig, had = v, true
			continue
		}
		out = append(out, e)
	}
	godebug := "containermaxprocs=0,updatemaxprocs=0"
	if orig != "" {
		godebug = orig + "," + godebug
	}
	out = append(out, "GODEBUG="+godebug)
	if had {
		out = append(out, envOrigGodebug+"="+orig)
	}
	return out
}

// appEnv undoes initEnv for the app.
func appEnv(env []string) []string {
	out := make([]string, 0, len(env))
	orig, had := "", false
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, envOrigGodebug+"="); ok {
			orig, had = v, true
		}
	}
	for _, e := range env {
		if strings.HasPrefix(e, "GODEBUG=") || strings.HasPrefix(e, envOrigGodebug+"=") {
			continue
		}
		out = append(out, e)
	}
	if had {
		out = append(out, "GODEBUG="+orig)
	}
	return out
}
