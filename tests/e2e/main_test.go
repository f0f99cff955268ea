//go:build e2e

// Package e2e runs Stasis end to end on a local cluster with real nodes: two kubelets v1.37 with
// their own containerd and runc on this machine (tests/cluster, hack/node), the test images built
// locally (hack/testimages), Stasis installed from deploy/ through deploy/overlays/local. Every
// scenario asserts on the application's own output (kubectl logs).
//
// Needs root, the apt packages of hack/deps.sh and the Kubernetes binaries (hack/k8s/build.sh);
// run it with `make e2e`. The cluster lives in $STASIS_E2E_DIR (default /tmp/stasis-e2e) and is torn
// down at the end, also when a test fails; a run that was killed is cleaned up by the next one, or
// by `hack/node/node.sh down /tmp/stasis-e2e`.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/tests/e2e/harness"
)

// env is the cluster every test of this package shares.
var env *harness.Env

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	t0 := time.Now()
	err := setup(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e setup:", err)
	}
	if env != nil && env.Local != nil {
		defer teardown()
		// Ctrl-C or a kill during the tests still tears the cluster down.
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
		go func() {
			<-sigs
			fmt.Fprintln(os.Stderr, "e2e: interrupted, tearing the cluster down")
			teardown()
			os.Exit(1)
		}()
	}
	if err != nil {
		return 1
	}
	logf("setup done in %s", since(t0))
	code := m.Run()
	logf("tests done %s after the start", since(t0))
	return code
}

func setup(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("the e2e tier needs root (kubelet, containerd, bridges, cgroups)")
	}
	for _, bin := range []string{"containerd", "ctr", "runc", "iptables", "ip", "nsenter", "unshare"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%s not found: run `make deps` (hack/deps.sh)", bin)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		return fmt.Errorf("CNI plugins missing in /usr/lib/cni: run `make deps` (containernetworking-plugins)")
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return err
	}
	t0 := time.Now()
	bin, err := cluster.Binaries()
	if err != nil {
		return err
	}
	images, err := harness.BuildTestImages(root)
	if err != nil {
		return err
	}
	logf("Kubernetes binaries and test images ready after %s", since(t0))

	dir := os.Getenv("STASIS_E2E_DIR")
	if dir == "" {
		dir = "/tmp/stasis-e2e"
	}
	t1 := time.Now()
	local, err := cluster.UpLocal(ctx, cluster.LocalOptions{
		Dir: dir, BinDir: bin, Images: images, Detach: os.Getenv("STASIS_E2E_KEEP") != "",
	})
	if err != nil {
		return err
	}
	env = &harness.Env{
		Local: local, Client: local.Client(), Kubeconfig: local.Kubeconfig(), Kubectl: bin + "/kubectl",
		Root: root, Dir: dir, CounterImage: cluster.CounterImage, Logf: logf,
	}
	logf("cluster up after %s: control plane %s, then both nodes Ready after %s (%s %s, %s %s); KUBECONFIG=%s",
		since(t1), local.ControlPlaneAfter.Round(time.Millisecond), local.NodesReadyAfter.Round(time.Millisecond),
		local.Nodes[0].Name, local.Nodes[0].ReadyAfter.Round(time.Millisecond),
		local.Nodes[1].Name, local.Nodes[1].ReadyAfter.Round(time.Millisecond), env.Kubeconfig)
	if os.Getenv("STASIS_E2E_NODES_ONLY") != "" {
		return nil // only the node tests (TestNodes*) can run
	}
	t2 := time.Now()
	tars, err := harness.StasisImages(root, filepath.Join(dir, "images"))
	if err != nil {
		return err
	}
	if err := local.Import(tars...); err != nil {
		return err
	}
	logf("Stasis images assembled and imported after %s", since(t2))
	return env.InstallStasis(ctx, "local")
}

func teardown() {
	if os.Getenv("STASIS_E2E_KEEP") != "" {
		logf("STASIS_E2E_KEEP set: the cluster stays up; tear it down with: hack/node/node.sh down %s", env.Dir)
		return
	}
	t0 := time.Now()
	if err := env.Local.Down(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e teardown:", err)
		return
	}
	logf("cluster torn down in %s", since(t0))
}

func logf(format string, args ...any) {
	fmt.Printf("e2e: "+format+"\n", args...)
}

func since(t time.Time) time.Duration { return time.Since(t).Round(10 * time.Millisecond) }
