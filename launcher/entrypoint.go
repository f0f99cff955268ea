package launcher

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/wiring"
)

// resolveCommand returns the command to start. When the pod set no command, the image's ENTRYPOINT
// and CMD come from the node agent (it reads the image config through the container runtime), and
// are combined the way Kubernetes does: spec args replace CMD, ENTRYPOINT stays.
func resolveCommand(ctx context.Context, env launchEnv, l wiring.Launch) ([]string, error) {
	if !l.EntrypointFromImage {
		return l.Command, nil
	}
	if env.pod.UID == "" || env.container == "" {
		return nil, fmt.Errorf("launcher: %s needs $%s and $%s to ask the agent for the image's entrypoint",
			wiring.FlagEntrypointFromImage, wiring.EnvPodUID, wiring.EnvContainerName)
	}
	var (
		ep  agentapi.Entrypoint
		err error
	)
	c := agentapi.NewLocalClient(env.socket, 10*time.Second)
	// The agent may be restarting (a DaemonSet rollout): retry for a while rather than crash-loop.
	for i := 0; i < 10; i++ {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		ep, err = c.Entrypoint(ctx, agentapi.LocalBase, env.pod.UID, env.container, env.image)
		cancel()
		// 404 and 403 are final (no such image; the agent does not take us for this pod's container).
		if err == nil || agentapi.IsNotFound(err) || agentapi.IsForbidden(err) {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		return nil, fmt.Errorf("launcher: the image's entrypoint is needed (the pod sets no command) but the agent at %s could not give it: %w", env.socket, err)
	}
	return CombineEntrypoint(ep, l.Command)
}

// CombineEntrypoint applies Kubernetes' rules for a container without command: ENTRYPOINT + args
// when args are given, else ENTRYPOINT + CMD.
func CombineEntrypoint(ep agentapi.Entrypoint, args []string) ([]string, error) {
	cmd := append([]string{}, ep.Entrypoint...)
	if len(args) > 0 {
		cmd = append(cmd, args...)
	} else {
		cmd = append(cmd, ep.Cmd...)
	}
	if len(cmd) == 0 {
		return nil, errors.New("launcher: the image has no ENTRYPOINT or CMD and the pod sets no command")
	}
	return cmd, nil
}
