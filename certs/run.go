package certs

import (
	"context"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"

	"github.com/stasis-k8s/stasis/internal/flagenv"
)

// Config is `stasis certs`' configuration.
type Config struct {
	Namespace string
	Service   string
	// OutDir receives the CA, one directory per Secret (the no-cert-manager overlay's
	// secretGenerator reads them) and secrets.yaml. An existing CA there is reused.
	OutDir string
	// Apply writes the Secrets to the cluster and the caBundle into the webhook configurations.
	Apply      bool
	Kubeconfig string
	// NewCA replaces an existing CA (every Secret and the caBundle change together).
	NewCA      bool
	Validity   time.Duration
	CAValidity time.Duration
	Logger     zerolog.Logger
}

func (c *Config) defaults() {
	if c.Namespace == "" {
		c.Namespace = "stasis-system"
	}
	if c.Service == "" {
		c.Service = "stasis-webhook"
	}
}

func (c *Config) validate() error {
	if c.OutDir == "" && !c.Apply {
		return errors.New("nothing to do: give --out-dir DIR (files for the no-cert-manager overlay) and/or --apply")
	}
	if c.Validity <= 0 {
		return fmt.Errorf("--validity %s: must be positive", c.Validity)
	}
	if c.CAValidity < c.Validity {
		return fmt.Errorf("--ca-validity %s: must be at least --validity %s", c.CAValidity, c.Validity)
	}
	return nil
}

// Run is `stasis certs`.
func Run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("certs", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: stasis certs [--out-dir DIR] [--apply] [flags]

Makes the TLS material of a Stasis install without cert-manager: a CA, the webhook's serving
certificate (Secret stasis-webhook-tls), the agents' serving certificate (stasis-agent-tls) and the
webhook's agent-client certificate (stasis-agent-client-tls), each Secret with the CA in ca.crt.

  --out-dir DIR  writes DIR/ca.{crt,key}, DIR/<secret>/{tls.crt,tls.key,ca.crt} and DIR/secrets.yaml;
                 deploy/overlays/no-cert-manager reads DIR=deploy/overlays/no-cert-manager/tls and
                 puts the CA into the webhook configurations' caBundle. A CA already in DIR is reused.
  --apply        creates/updates the Secrets in --namespace and sets the caBundle of every webhook
                 configuration annotated cert-manager.io/inject-ca-from: <namespace>/<service>.
                 Without --out-dir the CA is kept in the Secret stasis-ca of --namespace.

Rerun before --validity ends: with the same CA, the servers reload the renewed files without restart.

Flags:
`)
		fs.PrintDefaults()
	}
	var cfg Config
	fs.StringVar(&cfg.Namespace, "namespace", "stasis-system", "namespace of the webhook Service and the Secrets")
	fs.StringVar(&cfg.Service, "service", "stasis-webhook", "name of the webhook Service")
	fs.StringVar(&cfg.OutDir, "out-dir", "", "directory for the CA, the Secrets' files and secrets.yaml")
	fs.BoolVar(&cfg.Apply, "apply", false, "write the Secrets and the caBundle to the cluster")
	fs.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig for --apply (default: $KUBECONFIG, ~/.kube/config or in-cluster)")
	fs.BoolVar(&cfg.NewCA, "new-ca", false, "make a new CA even if one exists")
	fs.DurationVar(&cfg.Validity, "validity", 365*24*time.Hour, "validity of the leaf certificates")
	fs.DurationVar(&cfg.CAValidity, "ca-validity", 10*365*24*time.Hour, "validity of a new CA")
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	cfg.Logger = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, NoColor: true}).With().Timestamp().Logger()
	return Make(ctx, cfg)
}

// Make issues the certificates and writes and/or applies them.
func Make(ctx context.Context, cfg Config) error {
	cfg.defaults()
	if err := cfg.validate(); err != nil {
		return err
	}
	now := time.Now()
	var cl *cluster
	if cfg.Apply {
		var err error
		if cl, err = newCluster(cfg.Kubeconfig); err != nil {
			return err
		}
	}

	// The CA: reused from --out-dir, else from the cluster, else new.
	var ca Pair
	var haveCA bool
	var err error
	if !cfg.NewCA {
		switch {
		case cfg.OutDir != "":
			ca, haveCA, err = readCA(cfg.OutDir)
		case cl != nil:
			ca, haveCA, err = cl.readCA(ctx, cfg.Namespace)
		}
		if err != nil {
			return err
		}
	}
	if haveCA {
		cfg.Logger.Info().Msg("reusing the existing CA")
	} else {
		if ca, err = NewCA(now, cfg.CAValidity); err != nil {
			return err
		}
		cfg.Logger.Info().Str("validity", cfg.CAValidity.String()).Msg("created a new CA")
	}
	b, err := Issue(ca, Request{Namespace: cfg.Namespace, Service: cfg.Service, Validity: cfg.Validity, CAValidity: cfg.CAValidity, Now: now})
	if err != nil {
		return err
	}

	if cfg.OutDir != "" {
		if err := WriteDir(cfg.OutDir, cfg.Namespace, b); err != nil {
			return err
		}
		cfg.Logger.Info().Str("dir", cfg.OutDir).Msg("wrote the CA, the Secrets' files and secrets.yaml")
	}
	if cl != nil {
		if cfg.OutDir == "" {
			if err := cl.writeCA(ctx, cfg.Namespace, ca); err != nil {
				return err
			}
		}
		if err := cl.applySecrets(ctx, cfg.Namespace, b.Secrets); err != nil {
			return err
		}
		n, err := cl.injectCABundle(ctx, cfg.Namespace+"/"+cfg.Service, b.CABundle())
		if err != nil {
			return err
		}
		if n == 0 {
			cfg.Logger.Warn().Msgf("no webhook configuration is annotated %s=%s/%s yet: apply deploy/ and rerun, or set the caBundle yourself",
				InjectAnnotation, cfg.Namespace, cfg.Service)
		}
		cfg.Logger.Info().Int("webhookConfigurations", n).Msg("applied the Secrets and the caBundle")
	}
	return nil
}

// WriteDir writes the bundle's files below dir: the CA, one folder per Secret, and secrets.yaml.
// Private keys are 0600.
func WriteDir(dir, namespace string, b Bundle) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	files := map[string][]byte{
		"ca.crt":       b.CA.CertPEM,
		"ca.key":       b.CA.KeyPEM,
		"secrets.yaml": SecretManifests(namespace, b.Secrets),
	}
	for _, s := range b.Secrets {
		for k, v := range s.Data {
			files[filepath.Join(s.Name, k)] = v
		}
	}
	for name, data := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			return err
		}
		mode := os.FileMode(0o644)
		if filepath.Base(name) == "tls.key" || name == "ca.key" || name == "secrets.yaml" {
			mode = 0o600
		}
		// Write then rename: a reader (or a kustomize build) never sees half a key.
		tmp := p + ".tmp"
		if err := os.WriteFile(tmp, data, mode); err != nil {
			return err
		}
		if err := os.Rename(tmp, p); err != nil {
			return err
		}
	}
	return nil
}

func readCA(dir string) (Pair, bool, error) {
	crt, errC := os.ReadFile(filepath.Join(dir, "ca.crt"))
	key, errK := os.ReadFile(filepath.Join(dir, "ca.key"))
	switch {
	case errors.Is(errC, os.ErrNotExist) && errors.Is(errK, os.ErrNotExist):
		return Pair{}, false, nil
	case errC != nil:
		return Pair{}, false, fmt.Errorf("existing CA in %s: %w (use --new-ca to replace it)", dir, errC)
	case errK != nil:
		return Pair{}, false, fmt.Errorf("existing CA in %s: %w (use --new-ca to replace it)", dir, errK)
	}
	ca := Pair{CertPEM: crt, KeyPEM: key}
	if _, _, err := parseCA(ca); err != nil {
		return Pair{}, false, fmt.Errorf("existing CA in %s: %w (use --new-ca to replace it)", dir, err)
	}
	return ca, true, nil
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
