// Command image assembles Stasis' two container images without Docker or a registry, as
// docker-archive tarballs that `ctr -n k8s.io images import` (and `docker load`) accept:
//
//	stasis-webhook  the static stasis binary on an otherwise empty, non-root filesystem
//	stasis-agent    the stasis binary (/usr/local/bin/stasis), CRIU 4.x unpacked with its own loader
//	                and libraries (/usr/local/lib/stasis/criu/, entry point the wrapper `criu`), and a
//	                minimal rootfs: nsenter, sh, readlink and dirname (the CRIU wrapper uses them)
//	                with the shared libraries they need, copied from this machine
//
// The Dockerfile at the repository root describes the same two images (same paths, users,
// entrypoints) for a machine with Docker; this program is what builds them here. The image names
// come from deploy/base/kustomization.yaml's `images:` (the one place they are set) unless given.
// Output is reproducible: fixed timestamps and ownership, sorted entries.
//
// Usage:
//
//	go run ./hack/image --out DIR [--stasis bin/stasis] [--criu-dir $STASIS_CACHE/criu]
//
// Prints one line per image: "<name:tag> <file>".
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

func main() {
	cache := os.Getenv("STASIS_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "stasis")
	}
	var opts Options
	flag.StringVar(&opts.OutDir, "out", "", "directory for stasis-webhook.tar and stasis-agent.tar (required)")
	flag.StringVar(&opts.Stasis, "stasis", "bin/stasis", "the stasis binary (static: CGO_ENABLED=0, as `make build` makes it)")
	flag.StringVar(&opts.CriuDir, "criu-dir", filepath.Join(cache, "criu"), "CRIU bundle from hack/criu/install.sh (wrapper `criu` and `root/`)")
	flag.StringVar(&opts.Kustomization, "kustomization", "deploy/base/kustomization.yaml", "where the image names and tags are set")
	flag.StringVar(&opts.WebhookRef, "webhook-image", "", "name:tag of the webhook image (default: from --kustomization)")
	flag.StringVar(&opts.AgentRef, "agent-image", "", "name:tag of the agent image (default: from --kustomization)")
	flag.Parse()
	if err := run(opts); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(opts Options) error {
	if opts.OutDir == "" {
		return fmt.Errorf("--out is required")
	}
	built, err := Build(opts)
	if err != nil {
		return err
	}
	for _, b := range built {
		fmt.Printf("%s %s\n", b.Ref, b.File)
	}
	return nil
}
