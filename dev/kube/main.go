// Command mayfly-kube is the Kubernetes API server that dev/services.py runs for the tests
// (DESIGN.md, "Real services"): a real kube-apiserver with an embedded etcd, in one process,
// so that stopping it stops both. No controllers, scheduler or nodes: it stores and validates
// objects (CRD schemas included), which is what checking the knative/ manifests needs.
//
//	mayfly-kube serve -etcd-dir DIR [-etcd-client-port N] [-etcd-peer-port N]
//	    [-kubeconfig FILE -crds FILE.json [-namespace NAME]...] -- KUBE-APISERVER-FLAGS...
//	mayfly-kube certs DIR [NAME|IP]...
//	mayfly-kube crds OUT_DIR OUT_JSON SRC_DIR...
//
// serve starts etcd on 127.0.0.1, waits until it is ready, then runs kube-apiserver with the
// given flags (pointing --etcd-servers at it is the caller's job); on SIGTERM or SIGINT the
// API server shuts down gracefully and etcd closes after it. With -crds it then waits for the
// API server's /readyz through -kubeconfig, creates the CustomResourceDefinitions in the JSON
// array file and each -namespace, and waits until every CRD is Established; if that fails,
// the process exits non-zero.
//
// certs writes the key material kube-apiserver needs into DIR, all new: ca.crt, a CA that
// signed serving.crt/serving.key (for 127.0.0.1, localhost and each extra NAME or IP:
// the `cluster` service's node address and in-cluster names; valid for a year), and
// sa.key, the RSA key that signs service-account tokens. A kubeconfig can then pin ca.crt
// before the server has even started.
//
// crds copies every CustomResourceDefinition found in the YAML files under the SRC_DIRs
// into OUT_DIR, one file per CRD named after it (e.g. services.serving.knative.dev.yaml),
// and writes them all as one JSON array to OUT_JSON, ready to POST one by one. Files that
// hold no CRD are skipped; a CRD name found twice is an error.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
	_ "time/tzdata" // as upstream's kube-apiserver main: for CronJob time zones

	"go.etcd.io/etcd/server/v3/embed"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensions "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // as upstream's main
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // as upstream's main
	_ "k8s.io/component-base/metrics/prometheus/version"  // as upstream's main
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	"sigs.k8s.io/yaml"
)

const usage = `usage:
  mayfly-kube serve -etcd-dir DIR [-etcd-client-port N] [-etcd-peer-port N]
      [-kubeconfig FILE -crds FILE.json [-namespace NAME]...] -- KUBE-APISERVER-FLAGS...
  mayfly-kube certs DIR [NAME|IP]...
  mayfly-kube crds OUT_DIR OUT_JSON SRC_DIR...
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		os.Exit(serve(os.Args[2:]))
	case "certs":
		if len(os.Args) < 3 {
			fmt.Fprint(os.Stderr, usage)
			os.Exit(2)
		}
		err = certs(os.Args[2], os.Args[3:])
	case "crds":
		if len(os.Args) < 5 {
			fmt.Fprint(os.Stderr, usage)
			os.Exit(2)
		}
		err = crds(os.Args[2], os.Args[3], os.Args[4:])
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "mayfly-kube %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func serve(args []string) int {
	flags := flag.NewFlagSet("serve", flag.ExitOnError)
	dir := flags.String("etcd-dir", "", "etcd's data folder (required)")
	clientPort := flags.Int("etcd-client-port", 2379, "etcd client port on 127.0.0.1")
	peerPort := flags.Int("etcd-peer-port", 2380, "etcd peer port on 127.0.0.1")
	kubeconfig := flags.String("kubeconfig", "", "how to reach the API server, for -crds")
	crdFile := flags.String("crds", "", "JSON array of CRDs to create once the server is ready")
	var namespaces stringList
	flags.Var(&namespaces, "namespace", "a namespace to create with the CRDs (repeatable)")
	_ = flags.Parse(args) // everything after "--" is kube-apiserver's
	if *dir == "" || (*crdFile != "") != (*kubeconfig != "") {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}

	etcd, err := startEtcd(*dir, *clientPort, *peerPort)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mayfly-kube serve: etcd: %v\n", err)
		return 1
	}
	defer etcd.Close() // after the API server has stopped using it

	// NewAPIServerCommand installs the SIGTERM/SIGINT handler: the first signal starts a
	// graceful shutdown and Run returns after it; a second one exits at once.
	command := app.NewAPIServerCommand()
	command.SetArgs(flags.Args())
	if *crdFile != "" {
		go func() {
			if err := setUp(*kubeconfig, *crdFile, namespaces); err != nil {
				fmt.Fprintf(os.Stderr, "mayfly-kube serve: installing CRDs: %v\n", err)
				etcd.Close()
				os.Exit(1)
			}
			fmt.Fprintf(os.Stderr, "mayfly-kube serve: CRDs from %s established\n", *crdFile)
		}()
	}
	return cli.Run(command)
}

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// setUp waits for the API server, then creates the namespaces and CRDs and waits until
// every CRD is Established (its API is served).
func setUp(kubeconfig, crdFile string, namespaces []string) error {
	data, err := os.ReadFile(crdFile)
	if err != nil {
		return err
	}
	var crds []apiextensionsv1.CustomResourceDefinition
	if err := json.Unmarshal(data, &crds); err != nil {
		return fmt.Errorf("%s: %w", crdFile, err)
	}
	config, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	core, err := kubernetes.NewForConfig(config)
	if err != nil {
		return err
	}
	ext, err := apiextensions.NewForConfig(config)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var last error
	err = wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		_, last = core.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return last == nil, nil
	})
	if err != nil {
		return fmt.Errorf("API server not ready: %w (last answer: %v)", err, last)
	}
	for _, name := range namespaces {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
		_, err := core.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("namespace %s: %w", name, err)
		}
	}
	for i := range crds {
		_, err := ext.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, &crds[i], metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("CRD %s: %w", crds[i].Name, err)
		}
	}
	for _, crd := range crds {
		err := wait.PollUntilContextCancel(ctx, 100*time.Millisecond, true, func(ctx context.Context) (bool, error) {
			got, err := ext.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			for _, c := range got.Status.Conditions {
				if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("CRD %s not established: %w", crd.Name, err)
		}
	}
	return nil
}

func startEtcd(dir string, clientPort, peerPort int) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "mayfly"
	cfg.Dir = dir
	client := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", clientPort)}
	peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", peerPort)}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	// Test data, wiped on every start: durability buys nothing and fsync costs seconds.
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, err
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, errors.New("not ready after 60s")
	}
}

func certs(dir string, names []string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "mayfly-kube-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(1, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	serverKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serverTemplate := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "mayfly-kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	for _, name := range names {
		if ip := net.ParseIP(name); ip != nil {
			serverTemplate.IPAddresses = append(serverTemplate.IPAddresses, ip)
		} else {
			serverTemplate.DNSNames = append(serverTemplate.DNSNames, name)
		}
	}
	serverDER, err := x509.CreateCertificate(rand.Reader, serverTemplate, ca, &serverKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	serverKeyDER, err := x509.MarshalECPrivateKey(serverKey)
	if err != nil {
		return err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	files := []struct {
		name  string
		block pem.Block
		mode  os.FileMode
	}{
		{"ca.crt", pem.Block{Type: "CERTIFICATE", Bytes: caDER}, 0o644},
		{"serving.crt", pem.Block{Type: "CERTIFICATE", Bytes: serverDER}, 0o644},
		{"serving.key", pem.Block{Type: "EC PRIVATE KEY", Bytes: serverKeyDER}, 0o600},
		{"sa.key", pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}, 0o600},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.name), pem.EncodeToMemory(&f.block), f.mode); err != nil {
			return err
		}
	}
	return nil
}

type crd struct {
	name string
	yaml []byte
	obj  map[string]any
}

func crds(outDir, outJSON string, srcDirs []string) error {
	found := map[string]crd{}
	for _, src := range srcDirs {
		err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			if ext := filepath.Ext(path); ext != ".yaml" && ext != ".yml" {
				return nil
			}
			docs, err := crdsInFile(path)
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			for _, c := range docs {
				if _, dup := found[c.name]; dup {
					return fmt.Errorf("%s: CRD %s found twice", path, c.name)
				}
				found[c.name] = c
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	if len(found) == 0 {
		return fmt.Errorf("no CustomResourceDefinition under %s", strings.Join(srcDirs, ", "))
	}
	names := make([]string, 0, len(found))
	for name := range found {
		names = append(names, name)
	}
	sort.Strings(names)
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	all := make([]map[string]any, 0, len(names))
	for _, name := range names {
		c := found[name]
		if err := os.WriteFile(filepath.Join(outDir, name+".yaml"), c.yaml, 0o644); err != nil {
			return err
		}
		all = append(all, c.obj)
	}
	data, err := json.Marshal(all)
	if err != nil {
		return err
	}
	return os.WriteFile(outJSON, data, 0o644)
}

func crdsInFile(path string) ([]crd, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []crd
	reader := utilyaml.NewYAMLReader(bufio.NewReader(f))
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		// Config folders also hold other YAML (Prometheus rules, lists, templates): only a
		// document that mentions CustomResourceDefinition must parse.
		var parsed any
		if err := yaml.Unmarshal(doc, &parsed); err != nil {
			if bytes.Contains(doc, []byte("CustomResourceDefinition")) {
				return nil, err
			}
			continue
		}
		obj, _ := parsed.(map[string]any)
		if obj["kind"] != "CustomResourceDefinition" {
			continue
		}
		if obj["apiVersion"] != "apiextensions.k8s.io/v1" {
			return nil, fmt.Errorf("CRD with apiVersion %v, want apiextensions.k8s.io/v1", obj["apiVersion"])
		}
		meta, _ := obj["metadata"].(map[string]any)
		name, _ := meta["name"].(string)
		if name == "" {
			return nil, errors.New("CRD without metadata.name")
		}
		// No Knative webhook runs beside this API server. A CRD whose versions convert through
		// one (KafkaSource, PingSource, EventType, KafkaChannel) would refuse every request
		// ("service kafka-webhook-eventing not found"), so the installed copy converts by
		// relabelling (strategy None): enough to check objects against one version's schema.
		if spec, ok := obj["spec"].(map[string]any); ok {
			if conv, ok := spec["conversion"].(map[string]any); ok && conv["strategy"] == "Webhook" {
				spec["conversion"] = map[string]any{"strategy": "None"}
			}
		}
		doc = append(bytes.TrimSpace(doc), '\n')
		out = append(out, crd{name: name, yaml: doc, obj: obj})
	}
}
