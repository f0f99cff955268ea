// Package launcher is `stasis launcher`, PID 1 of every checkpoint-enabled container. It holds no
// privilege and needs none: every privileged step (dump, restore) is the node agent's.
//
// Fresh start: the launcher keeps the low PIDs of the container's PID namespace for itself and for
// a later restore (reservePIDs), starts the app as its child in a session of its own, forwards
// every signal to it, reaps every orphan of the container and exits with the app's status. The
// app's tree is what the agent dumps.
//
// Restore: when the pod was created to continue a checkpoint, the launcher asks the agent to
// restore it into this container; the agent runs CRIU inside the container's namespaces, and the
// restored app comes back as the launcher's child (CRIU's orphans go to PID 1), with the same
// PIDs it had. Anything wrong with the checkpoint or the restore falls back to a cold start: a
// checkpoint problem must never become a crash loop.
package launcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/wiring"
)

// Overrides of the in-pod paths, for running the launcher outside a wired pod (tests, debugging).
const (
	EnvAgentSocket = "STASIS_AGENT_SOCKET" // default wiring.AgentSocket (abstract, in the pod's network namespace)
	// EnvRestoreTimeout bounds the agent's restore (Go duration, default 5m); then a cold start.
	EnvRestoreTimeout = "STASIS_RESTORE_TIMEOUT"
)

// discoverTries bounds how long a fresh start waits for the agent (one try a second) to learn
// whether a checkpoint of its identity exists: the agent's channel appears in a new pod within
// a fraction of a second; an agent that is down must not hold every new pod for long.
const discoverTries = 5

// ReservedPIDs is the PID range kept free for the launcher's threads and the agent's CRIU: a
// restore gives every process its old PID, so none of the app's may be one of theirs.
const ReservedPIDs = 128

// Run is `stasis launcher`. It does not return on success: it exits with the app's status.
func Run(ctx context.Context, args []string) error {
	log := zerolog.New(os.Stderr).With().Timestamp().Str("component", "stasis-launcher").Logger()
	l, err := wiring.ParseLauncherArgs(args)
	if err != nil {
		return err
	}
	// Nothing but stdio may reach the app: an fd inherited from the runtime (opened in another
	// mount namespace) makes CRIU fail ("Can't lookup mount").
	_ = unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	// Orphans of the app, and the restored app itself, must come back to us even when we are not
	// PID 1 (tests, debugging).
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("launcher: PR_SET_CHILD_SUBREAPER: %w", err)
	}
	// Catch every signal from now on: the kubelet's SIGTERM must reach the app whatever phase we are in.
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs)
	env := readEnv()
	s := &supervisor{log: log, sigs: sigs, watchdog: env.watchdog, grace: env.grace}
	if env.pod.UID != "" { // wired by the webhook: the agent checkpoints the pod on SIGTERM
		c := agentapi.NewLocalClient(env.socket, 0)
		s.checkpoint = func(ctx context.Context) (agentapi.CheckpointStatus, error) {
			return c.CheckpointOnTermination(ctx, agentapi.LocalBase)
		}
		s.consumed = func(ctx context.Context) error { return c.Consumed(ctx, agentapi.LocalBase) }
	}

	// Created to restore a recorded checkpoint, or maybe one taken on termination that nothing
	// recorded: the agent looks for the newest (a first start has none, and starts at once).
	if env.restoreID != "" || env.pod.UID != "" {
		tries := 30
		if env.restoreID == "" {
			tries = discoverTries
		}
		res := askRestore(ctx, log, env, tries)
		if res.Restored {
			log.Info().Int("pid", res.PID).Str("checkpoint", res.CheckpointID).Msg("restored; supervising the restored tree")
			// The restored app's future children must stay above the reserved range too.
			if err := reservePIDs(); err != nil {
				log.Warn().Err(err).Msg("reserving PIDs after the restore")
			}
			code := s.supervise(res.PID)
			if !s.killedByAgent(ctx, env, code) {
				os.Exit(s.ended(code))
			}
		} else if env.restoreID != "" {
			log.Warn().Str("checkpoint", env.restoreID).Str("reason", res.Message).Msg("COLD START instead of restore")
		} else {
			log.Debug().Str("reason", res.Message).Msg("nothing to continue: fresh start")
		}
	}

	cmd, err := resolveCommand(ctx, env, l)
	if err != nil {
		return err
	}
	if err := reservePIDs(); err != nil {
		return fmt.Errorf("launcher: %w", err)
	}
	pid, err := startApp(cmd)
	if err != nil {
		return fmt.Errorf("launcher: starting %q: %w", cmd, err)
	}
	log.Debug().Strs("command", cmd).Int("pid", pid).Msg("started")
	os.Exit(s.ended(s.supervise(pid)))
	return nil
}

type launchEnv struct {
	pod       agentapi.PodRef
	container string
	image     string
	restoreID string
	options   string
	socket    string
	timeout   time.Duration
	watchdog  time.Duration
	grace     time.Duration
}

func readEnv() launchEnv {
	e := launchEnv{
		pod: agentapi.PodRef{
			Namespace: os.Getenv(wiring.EnvPodNamespace),
			Name:      os.Getenv(wiring.EnvPodName),
			UID:       os.Getenv(wiring.EnvPodUID),
		},
		container: os.Getenv(wiring.EnvContainerName),
		image:     os.Getenv(wiring.EnvImage),
		restoreID: os.Getenv(wiring.EnvRestoreID),
		options:   os.Getenv(wiring.EnvRestoreOptions),
		socket:    envOr(EnvAgentSocket, wiring.AgentSocket),
		timeout:   5 * time.Minute,
		watchdog:  wiring.DefaultFreezeWatchdog,
		grace:     30 * time.Second, // the Kubernetes default terminationGracePeriodSeconds
	}
	if n, err := strconv.Atoi(os.Getenv(wiring.EnvGracePeriod)); err == nil && n >= 0 {
		e.grace = time.Duration(n) * time.Second
	}
	if d, err := time.ParseDuration(os.Getenv(EnvRestoreTimeout)); err == nil && d > 0 {
		e.timeout = d
	}
	if d, err := time.ParseDuration(os.Getenv(wiring.EnvFreezeWatchdog)); err == nil && d > 0 {
		e.watchdog = d
	}
	return e
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// askRestore asks the agent to restore this container and waits for the answer. An agent that is
// not there yet (a DaemonSet rollout) is retried for a while; then, and on any refusal, a cold start.
func askRestore(ctx context.Context, log zerolog.Logger, env launchEnv, tries int) agentapi.RestoreResponse {
	req := agentapi.RestoreRequest{Pod: env.pod, Container: env.container, CheckpointID: env.restoreID}
	if env.options != "" {
		if err := json.Unmarshal([]byte(env.options), &req.Options); err != nil {
			return agentapi.RestoreResponse{Message: fmt.Sprintf("$%s: not a JSON array of strings: %v", wiring.EnvRestoreOptions, err)}
		}
	}
	c := agentapi.NewLocalClient(env.socket, env.timeout+30*time.Second)
	var err error
	if !strings.HasPrefix(env.socket, "@") {
		if _, serr := os.Stat(env.socket); serr != nil && env.restoreID == "" {
			return agentapi.RestoreResponse{Message: "no agent socket at " + env.socket}
		}
	}
	for i := 0; i < tries; i++ {
		var res agentapi.RestoreResponse
		if res, err = c.Restore(ctx, agentapi.LocalBase, req); err == nil {
			return res
		}
		var se *agentapi.StatusError
		if (errors.As(err, &se) && se.Code != http.StatusTooManyRequests) || ctx.Err() != nil {
			break // the agent answered: no use asking again
		}
		log.Info().Err(err).Msg("the agent cannot answer yet; retrying")
		time.Sleep(time.Second)
	}
	return agentapi.RestoreResponse{Message: fmt.Sprintf("asking the agent at %s to restore: %v", env.socket, err)}
}

// reservePIDs makes the PID namespace hand out PIDs above ReservedPIDs from now on, the only way
// without privilege: by using them up. Threads are the cheapest users: a goroutine that exits
// while locked to its thread takes the thread with it, so each round creates a new one (its TID
// is a PID of the namespace). (A restore gives the app its old PIDs; the launcher's threads and
// the agent's CRIU get the low ones in the new container, so the app must never have had those.)
func reservePIDs() error {
	for i := 0; i < 4*ReservedPIDs; i++ {
		tid := make(chan int)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
			tid <- unix.Gettid()
		}()
		if <-tid >= ReservedPIDs {
			return nil
		}
	}
	return fmt.Errorf("reserving PIDs: still below %d after %d threads", ReservedPIDs, 4*ReservedPIDs)
}

// startApp starts the app as our child, in a session of its own (CRIU needs the session leader
// inside the dumped tree). Only stdio is passed: an fd opened in another mount namespace would make
// the dump fail.
func startApp(cmd []string) (int, error) {
	path, err := exec.LookPath(cmd[0])
	if err != nil {
		return 0, err
	}
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
	return syscall.ForkExec(path, cmd, &syscall.ProcAttr{
		Env:   os.Environ(),
		Files: files,
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
}

// supervisor forwards signals to the app and waits for it, reaping every other child.
type supervisor struct {
	log  zerolog.Logger
	sigs chan os.Signal
	// watchdog: an app stopped this long without a SIGTERM is resumed (the second line behind the
	// agent's thaw: an agent gone for good must not leave the app frozen forever).
	watchdog time.Duration
	// terminating: a SIGTERM was seen (the pod is being deleted).
	terminating bool
	// checkpoint asks the agent to checkpoint the pod on SIGTERM (nil: no agent, no checkpoint),
	// within grace, the pod's terminationGracePeriodSeconds.
	checkpoint func(ctx context.Context) (agentapi.CheckpointStatus, error)
	grace      time.Duration
	// consumed tells the agent the app finished its work (exit 0): its checkpoints go.
	consumed func(ctx context.Context) error
}

// ended reports a successful end to the agent (finished work is never continued by a later pod
// of the identity) and returns the exit code.
func (s *supervisor) ended(code int) int {
	if code != 0 || s.consumed == nil {
		return code
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.consumed(ctx); err != nil {
		s.log.Warn().Err(err).Msg("the app exited 0, but its checkpoints could not be marked consumed")
	}
	return code
}

// killedByAgent says whether the restored tree, which ended with code, was killed by the agent
// because its lazy restore failed after the resume (the checkpoint is then out of the candidates):
// the caller starts the app afresh in the same container, as it does when a restore fails before
// the resume, instead of exiting 137 (which a Job counts as a failed pod).
func (s *supervisor) killedByAgent(ctx context.Context, env launchEnv, code int) bool {
	if code != 128+int(syscall.SIGKILL) || s.terminating {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second) // the agent may wait for its guard
	defer cancel()
	o, err := agentapi.NewLocalClient(env.socket, 0).RestoreOutcome(ctx, agentapi.LocalBase)
	if err != nil {
		s.log.Warn().Err(err).Msg("the restored app was killed; the agent could not say why")
		return false
	}
	if !o.Killed {
		return false
	}
	s.log.Warn().Str("checkpoint", o.CheckpointID).Str("reason", o.Message).
		Msg("COLD START: the agent killed the restored app (its memory could not all be restored) and set the checkpoint aside")
	return true
}

// supervise returns the exit code of the app (pid, our child): its exit status, or 128+n when
// killed by signal n. On SIGTERM, an app that is stopped (the agent dumped it and left it frozen)
// is killed with its whole tree, not resumed: it must not run on after its checkpoint, and the
// container exits 143 so that a Job pod never counts as Succeeded.
func (s *supervisor) supervise(pid int) int {
	exited := make(chan int, 1)
	go func() { exited <- reapUntil(pid) }()
	frozenKill, terminating := false, false
	var checkpointed chan bool // the checkpoint asked on SIGTERM, while it runs
	w := watchdog{every: min(s.watchdog/4, 5*time.Second)}
	tick := time.NewTicker(max(w.every, 10*time.Millisecond))
	defer tick.Stop()
	kill := func(why string) {
		s.log.Info().Int("pid", pid).Msg(why + ": killing it")
		frozenKill = true
		_ = criurun.SignalTree(pid, syscall.SIGKILL)
	}
	for {
		select {
		case code := <-exited:
			if frozenKill {
				s.log.Info().Msg("the checkpointed app was killed; exiting 143")
				return 128 + int(syscall.SIGTERM)
			}
			return code
		case <-tick.C:
			if !terminating && w.stoppedFor(Stopped(pid)) >= s.watchdog {
				s.log.Warn().Int("pid", pid).Dur("stopped", s.watchdog).Msg("the app stayed frozen without its pod being deleted and without the agent thawing it: resuming it")
				_ = criurun.SignalTree(pid, syscall.SIGCONT)
				w = watchdog{every: w.every}
			}
		case ok := <-checkpointed:
			checkpointed = nil
			if ok && Stopped(pid) {
				kill("checkpointed on termination, the app is frozen")
				continue
			}
			_ = syscall.Kill(pid, syscall.SIGTERM) // no checkpoint: the app ends the way it would without Stasis
		case sig := <-s.sigs:
			n, ok := sig.(syscall.Signal)
			if !ok || n == syscall.SIGCHLD || n == syscall.SIGURG {
				continue // SIGURG is the Go runtime's preemption signal
			}
			first := n == syscall.SIGTERM && !terminating
			if n == syscall.SIGTERM {
				terminating = true // the pod is being deleted: never resume a frozen app now
				s.terminating = true
			}
			switch {
			case n == syscall.SIGTERM && Stopped(pid):
				kill("SIGTERM while the app is frozen after its checkpoint")
			case first && s.checkpoint != nil:
				checkpointed = s.checkpointOnTermination()
			case n == syscall.SIGTERM && checkpointed != nil:
				// Held until the checkpoint is done.
			default:
				_ = syscall.Kill(pid, n)
			}
		}
	}
}

// checkpointOnTermination asks the agent for a checkpoint of the pod within the grace period the
// kubelet gives (less a margin to end the app), and reports whether it completed.
func (s *supervisor) checkpointOnTermination() chan bool {
	done := make(chan bool, 1)
	budget := max(s.grace-terminationMargin, time.Second)
	s.log.Info().Dur("budget", budget).Msg("SIGTERM: checkpointing the pod before the app ends")
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), budget)
		defer cancel()
		st, err := s.checkpoint(ctx)
		switch {
		case err != nil:
			s.log.Warn().Err(err).Msg("no checkpoint on termination: passing SIGTERM to the app")
		case st.Phase != agentapi.PhaseSucceeded:
			s.log.Warn().Str("phase", string(st.Phase)).Str("reason", st.Message).Msg("no checkpoint on termination: passing SIGTERM to the app")
		default:
			s.log.Info().Str("checkpoint", checkpointID(st)).Msg("checkpointed on termination")
		}
		done <- err == nil && st.Phase == agentapi.PhaseSucceeded
	}()
	return done
}

// terminationMargin is what the launcher keeps of the grace period to end the app after the
// checkpoint (or to let it end by itself when there is none); the webhook's grace warning counts
// with the same margin.
const terminationMargin = wiring.TerminationMargin

func checkpointID(st agentapi.CheckpointStatus) string {
	if len(st.Containers) > 0 {
		return st.Containers[0].CheckpointID
	}
	return ""
}

// watchdog measures how long the app has been seen stopped, tick after tick.
type watchdog struct {
	every time.Duration
	since time.Time // first tick the app was seen stopped (zero: running)
}

func (w *watchdog) stoppedFor(stopped bool) time.Duration {
	if !stopped {
		w.since = time.Time{}
		return 0
	}
	if w.since.IsZero() {
		w.since = time.Now()
	}
	return time.Since(w.since) + w.every // it may have stopped just after the previous tick
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
