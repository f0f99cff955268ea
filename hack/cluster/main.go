// Command cluster is the README's run command behind `make demo` and `make down`.
//
//	go run ./hack/cluster demo   provision a local 2-node cluster (real kubelets and containerd on
//	                             this machine), install Stasis from deploy/overlays/local, run
//	                             scenario 1 visibly and leave the cluster up
//	go run ./hack/cluster up     the same without the scenario
//	go run ./hack/cluster down   tear the local cluster down (everything it changed on the host)
//
// With --kubeconfig (or $KUBECONFIG) and demo, no cluster is provisioned: Stasis is installed into
// the given cluster through --overlay (default no-cert-manager; its images must be pullable there)
// and the scenario runs with --counter-image.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/tests/e2e/harness"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "cluster:", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) < 2 {
		return errors.New("usage: go run ./hack/cluster demo|up|down [flags]")
	}
	sub := os.Args[1]
	fs := flag.NewFlagSet(sub, flag.ContinueOnError)
	dir := fs.String("dir", envOr("STASIS_DEMO_DIR", "/var/tmp/stasis-demo"), "directory of the local cluster")
	kubeconfig := fs.String("kubeconfig", "", "run against this cluster instead of provisioning one (demo only)")
	overlay := fs.String("overlay", "", "deploy/overlays/<name> to install (default: local, or no-cert-manager with --kubeconfig)")
	counterImage := fs.String("counter-image", cluster.CounterImage, "image of the counter app (hack/testimages/counter)")
	if err := fs.Parse(os.Args[2:]); err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	root, err := cluster.RepoRoot()
	if err != nil {
		return err
	}
	switch sub {
	case "down":
		t0 := time.Now()
		if err := cluster.TeardownDir(*dir); err != nil {
			return err
		}
		if err := os.RemoveAll(*dir); err != nil {
			return err
		}
		fmt.Printf("local cluster in %s torn down in %s\n", *dir, time.Since(t0).Round(10*time.Millisecond))
		return nil
	case "up", "demo":
	default:
		return fmt.Errorf("unknown command %q: demo, up or down", sub)
	}

	var env *harness.Env
	if *kubeconfig != "" && sub == "demo" {
		if env, err = external(root, *kubeconfig, *counterImage); err != nil {
			return err
		}
		if *overlay == "" {
			*overlay = "no-cert-manager"
		}
	} else {
		if env, err = provision(ctx, root, *dir); err != nil {
			return err
		}
	}
	if err := env.InstallStasis(ctx, *overlay); err != nil {
		return err
	}
	if sub == "demo" {
		if err := demo(ctx, env); err != nil {
			return err
		}
	}
	fmt.Printf("\nThe cluster stays up. Use it with:\n  export KUBECONFIG=%s\n  %s get pods -A\n", env.Kubeconfig, env.Kubectl)
	if env.Local != nil {
		fmt.Printf("Tear it down with: make down\n")
	}
	return nil
}

func provision(ctx context.Context, root, dir string) (*harness.Env, error) {
	t0 := time.Now()
	bin, err := cluster.Binaries()
	if err != nil {
		return nil, err
	}
	images, err := harness.BuildTestImages(root)
	if err != nil {
		return nil, err
	}
	// Not inside dir: UpLocal starts from an empty cluster directory.
	imgDir, err := os.MkdirTemp("", "stasis-images-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(imgDir)
	stasis, err := harness.StasisImages(root, imgDir)
	if err != nil {
		return nil, err
	}
	fmt.Printf("binaries and images ready after %s; starting the cluster in %s\n", time.Since(t0).Round(10*time.Millisecond), dir)
	local, err := cluster.UpLocal(ctx, cluster.LocalOptions{
		Dir: dir, BinDir: bin, Images: append(images, stasis...), Detach: true,
	})
	if err != nil {
		return nil, err
	}
	fmt.Printf("control plane up after %s, nodes %s and %s Ready %s later\n", local.ControlPlaneAfter.Round(10*time.Millisecond),
		local.Nodes[0].Name, local.Nodes[1].Name, local.NodesReadyAfter.Round(10*time.Millisecond))
	return &harness.Env{
		Local: local, Client: local.Client(), Kubeconfig: local.Kubeconfig(), Kubectl: filepath.Join(bin, "kubectl"),
		Root: root, Dir: dir, CounterImage: cluster.CounterImage, Logf: printf,
	}, nil
}

func external(root, kubeconfig, counterImage string) (*harness.Env, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	bin, err := cluster.Binaries()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "stasis-demo-")
	if err != nil {
		return nil, err
	}
	return &harness.Env{
		Client: client, Kubeconfig: kubeconfig, Kubectl: filepath.Join(bin, "kubectl"),
		Root: root, Dir: dir, CounterImage: counterImage, Logf: printf,
	}, nil
}

// demo is scenario 1, printed as it happens.
func demo(ctx context.Context, env *harness.Env) error {
	const ns = "stasis-demo"
	if _, err := env.Run(ctx, "create", "namespace", ns); err != nil {
		return err
	}
	fmt.Println("\n== Scenario 1: a checkpointed Job survives `kubectl drain` ==")
	r, err := env.JobDrain(ctx, ns, harness.CounterSpec{Name: "counter", Args: []string{"--to=60"}}, 10)
	if err != nil {
		return err
	}
	fmt.Printf("before the drain the counter printed: %s\n", tail(r.Before, 5))
	fmt.Printf("after the restore it printed:        %s\n", head(r.After, 5))
	fmt.Println(r.Summary())
	if err := env.Uncordon(ctx, r.OldPod.Spec.NodeName); err != nil {
		return err
	}
	job, err := env.WaitJobComplete(ctx, ns, "counter", 3*time.Minute)
	if err != nil {
		return err
	}
	fmt.Printf("Job finished: succeeded=%d failed=%d complete=%v\n", job.Status.Succeeded, job.Status.Failed, harness.JobSucceeded(job))
	return nil
}

func tail(o harness.CounterOutput, n int) string {
	l := o.Lines
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return nums(l)
}

func head(o harness.CounterOutput, n int) string {
	l := o.Lines
	if len(l) > n {
		l = l[:n]
	}
	return nums(l)
}

func nums(l []harness.CounterLine) string {
	s := ""
	for _, x := range l {
		s += fmt.Sprintf("%d ", x.N)
	}
	return s
}

func printf(format string, args ...any) { fmt.Printf("  "+format+"\n", args...) }

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
