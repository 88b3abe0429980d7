// Command mayfly-knative-objects prints every object in the YAML files it is given as one
// JSON array, in file order, skipping empty documents: dev/services applies Knative's own
// config objects (ConfigMaps, webhook configurations, Secrets) from the Go module cache to
// the test API server without a YAML parser of its own.
//
//	mayfly-knative-objects FILE...
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: mayfly-knative-objects FILE...")
		os.Exit(2)
	}
	objects := []json.RawMessage{}
	for _, path := range os.Args[1:] {
		found, err := read(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "mayfly-knative-objects: %s: %v\n", path, err)
			os.Exit(1)
		}
		objects = append(objects, found...)
	}
	out, err := json.Marshal(objects)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mayfly-knative-objects: %v\n", err)
		os.Exit(1)
	}
	os.Stdout.Write(append(out, '\n'))
}

func read(path string) ([]json.RawMessage, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	reader := utilyaml.NewYAMLReader(bufio.NewReader(file))
	var found []json.RawMessage
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return found, nil
		}
		if err != nil {
			return nil, err
		}
		converted, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, err
		}
		if converted = bytes.TrimSpace(converted); len(converted) == 0 || string(converted) == "null" {
			continue
		}
		found = append(found, converted)
	}
}
