//go:build integration

// Package integration runs the real `stasis webhook` binary inside a real kube-apiserver (with
// kube-controller-manager and kube-scheduler) started by tests/cluster. The agent side is
// tests/fakeagent (scripted dumps); there is no kubelet in this tier: the tests create Node objects
// and play the kubelet's part themselves (kubeletsim_test.go), which every test name says
// ("NoKubelet").
//
// One control plane, webhook and fake agent are shared by all tests (TestMain); each test works in
// its own namespace and on its own Nodes.
//
// Logs: every component writes to $dir/logs/<name>.log (kube-apiserver, etcd,
// kube-controller-manager, kube-scheduler, webhook). The directory is removed after a passing run
// and kept (its path printed) after a failing one; STASIS_INTEGRATION_DIR chooses it.
package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/tests/fakeagent"
)

// env is the shared test environment, set up once by TestMain.
var env *environment

type environment struct {
	dir        string
	kubectlBin string
	stasisBin  string
	cluster    *cluster.Cluster
	ca         *cluster.CA
	agent      *fakeagent.Agent
	webhook    *webhookProcess
	kubelet    *kubeletSim
}

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) (code int) {
	dir := os.Getenv("STASIS_INTEGRATION_DIR")
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "stasis-integration-"); err != nil {
			fmt.Fprintln(os.Stderr, "integration:", err)
			return 1
		}
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	e, err := setup(dir)
	if e != nil {
		defer func() {
			if err := e.teardown(); err != nil {
				fmt.Fprintln(os.Stderr, "integration: teardown:", err)
				if code == 0 {
					code = 1
				}
			}
			if code == 0 && os.Getenv("STASIS_INTEGRATION_DIR") == "" {
				_ = os.RemoveAll(dir)
			} else {
				fmt.Fprintf(os.Stderr, "integration: logs kept in %s/cluster/logs\n", dir)
			}
		}()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: setup failed:", err)
		return 1
	}
	env = e
	return m.Run()
}

func setup(dir string) (*environment, error) {
	bin, err := cluster.Binaries()
	if err != nil {
		return nil, fmt.Errorf("kubernetes binaries (hack/k8s/build.sh, or `make k8s`): %w", err)
	}
	e := &environment{dir: dir, kubectlBin: filepath.Join(bin, "kubectl")}
	if _, err := os.Stat(e.kubectlBin); err != nil {
		return nil, fmt.Errorf("kubectl v1.37.2 missing in %s: %w", bin, err)
	}

	if e.stasisBin, err = buildStasis(dir); err != nil {
		return nil, err
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	e.cluster, err = cluster.Start(ctx, cluster.Options{
		Dir:               filepath.Join(dir, "cluster"),
		BinDir:            bin,
		ControllerManager: true,
		Scheduler:         true,
		// No kubelet heartbeats here: the node lifecycle controller would taint and evict the
		// Nodes the tests create.
		ExtraControllerManagerArgs: []string{"--controllers=*,-node-lifecycle-controller"},
	})
	if err != nil {
		return nil, err
	}
	caCert, caKey := e.cluster.CA()
	if e.ca, err = cluster.LoadCA(caCert, caKey); err != nil {
		return e, err
	}
	if e.kubelet, err = startKubeletSim(e.cluster.Client()); err != nil {
		return e, err
	}
	if e.agent, err = startFakeAgent(e.ca); err != nil {
		return e, err
	}
	if err := applyWebhookRBAC(ctx, e); err != nil {
		return e, err
	}
	if e.webhook, err = newWebhookProcess(e); err != nil {
		return e, err
	}
	if err := e.webhook.start(ctx); err != nil {
		return e, err
	}
	if err := applyWebhookConfigurations(ctx, e); err != nil {
		return e, err
	}
	if err := waitWebhooksEffective(ctx, e); err != nil {
		return e, err
	}
	return e, nil
}

func (e *environment) teardown() error {
	var errs []error
	if e.webhook != nil {
		if err := e.webhook.stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if e.agent != nil {
		_ = e.agent.Close()
	}
	if e.kubelet != nil {
		e.kubelet.stop()
	}
	if e.cluster != nil {
		if err := e.cluster.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%v", errs)
	}
	return nil
}

// buildStasis builds the stasis binary the way `make build` does, into dir.
func buildStasis(dir string) (string, error) {
	if b := os.Getenv("STASIS_BIN"); b != "" {
		return b, nil
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "stasis")
	cmd := exec.Command("go", "build", "-o", out, ".")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build stasis: %v\n%s", err, b)
	}
	return out, nil
}
