package launcher

import (
	"os"
	"os/exec"
	"os/signal"
	"syscall"

	"github.com/rs/zerolog"
)

// runInit is PID 1 of the nested PID namespace: it starts the app, forwards every signal to it,
// reaps orphans, and exits with the app's status. It is dumped and restored together with the app,
// so it avoids anything CRIU might not carry over: it starts the app with syscall.ForkExec (no
// pidfd, unlike os/exec) and keeps no files open beyond stdio.
//
// A namespace's PID 1 gets no signal it has no handler for, even from outside: without this init
// the app (as PID 1) would ignore the kubelet's SIGTERM.
func runInit(log zerolog.Logger, args []string) int {
	if len(args) < 2 || args[0] != "--" {
		log.Error().Strs("args", args).Msg("nested init: expected -- COMMAND")
		return 127
	}
	cmd := args[1:]
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs)
	path, err := exec.LookPath(cmd[0])
	if err != nil {
		log.Error().Err(err).Str("command", cmd[0]).Msg("command not found")
		return 127
	}
	wd, _ := os.Getwd()
	pid, err := syscall.ForkExec(path, cmd, &syscall.ProcAttr{
		Dir:   wd,
		Env:   appEnv(os.Environ()),
		Files: []uintptr{0, 1, 2},
	})
	if err != nil {
		log.Error().Err(err).Strs("command", cmd).Msg("cannot start the command")
		return 126
	}
	exited := make(chan int, 1)
	go func() { exited <- reapUntil(pid) }()
	for {
		select {
		case code := <-exited:
			return code
		case sig := <-sigs:
			if n, ok := sig.(syscall.Signal); ok && n != syscall.SIGCHLD && n != syscall.SIGURG {
				_ = syscall.Kill(pid, n)
			}
		}
	}
}
